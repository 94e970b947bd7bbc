#!/bin/sh
# Boot a VM under cloud-hypervisor whose disk is served by vhost-user-blk.
#
# 1. Start the daemon (or use the systemd units in this directory):
#      vhost-user-blk --socket-path /run/vhost-user-blk/vm1.sock \
#          --control-socket /run/vhost-user-blk/vm1.ctl \
#          --blk-file /var/lib/vhost-user-blk/vm1.img --create 20G
# 2. Run this script with the kernel/firmware arguments for your guest, e.g.
#      ./cloud-hypervisor.sh --kernel /path/to/hypervisor-fw
set -eu

SOCK=${SOCK:-/run/vhost-user-blk/vm1.sock}
CPUS=${CPUS:-2}

# - shared=on: the daemon maps the guest's RAM.
# - num_queues: at most the daemon's --num-queues (default 64); queue_size at most
#   its --queue-size (default 256).
exec cloud-hypervisor \
    --cpus boot="$CPUS" \
    --memory size=2G,shared=on \
    --disk vhost_user=true,socket="$SOCK",num_queues="$CPUS",queue_size=256 \
    --serial tty --console off \
    "$@"
