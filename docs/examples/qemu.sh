#!/bin/sh
# Boot a VM whose disk is served by vhost-user-blk (QEMU >= 9.2 for reconnect-ms;
# older QEMU: reconnect=1).
#
# 1. Start the daemon (or use the systemd units in this directory):
#      vhost-user-blk --socket-path /run/vhost-user-blk/vm1.sock \
#          --control-socket /run/vhost-user-blk/vm1.ctl \
#          --blk-file /var/lib/vhost-user-blk/vm1.img --create 20G
# 2. Run this script.
set -eu

SOCK=${SOCK:-/run/vhost-user-blk/vm1.sock}
MEM=${MEM:-2G}
CPUS=${CPUS:-2}

# - The guest RAM must be shared (share=on) so the daemon can map it: a memfd
#   backend, or memory-backend-file on hugetlbfs with share=on.
# - reconnect-ms: when the daemon restarts, QEMU reconnects and the disk comes back.
# - num-queues: virtqueues the guest uses (default: one per vCPU); at most the
#   daemon's --num-queues (default 64).
# - Online resize (vhost-user-blk ctl ... resize 40G) reaches the guest through
#   QEMU's vhost-user backend channel without any extra option.
exec qemu-system-x86_64 \
    -machine q35,accel=kvm,memory-backend=mem \
    -cpu host -smp "$CPUS" -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -chardev socket,id=disk0,path="$SOCK",reconnect-ms=1000 \
    -device vhost-user-blk-pci,chardev=disk0,num-queues="$CPUS",bootindex=1 \
    -nographic \
    "$@"
