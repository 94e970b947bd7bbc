#!/usr/bin/env bash
# Boot the end-to-end test guest against an already-running vhost-user-blk
# backend and report whether the in-guest tests (ci/guest/init) passed.
#
# Usage: ci/guest/run.sh SOCKET
#
# Exit status: 0 only if the console shows "E2E-RESULT PASS".
#
# Env: VUB_GUEST_DIR      guest build dir (default <repo>/ci/.cache/guest)
#      VUB_GUEST_LOG      console log file (default: a new file in $TMPDIR)
#      VUB_GUEST_TIMEOUT  seconds before the VM is killed (default 300; the
#                         guest's own watchdog reports a hung step a bit earlier)
#      VUB_GUEST_ACCEL    force "kvm" or "tcg" (default: kvm only with real
#                         vmx/svm; this project's /dev/kvm may be PVM-based,
#                         where a stock guest kernel does not run)
#      VUB_GUEST_VERBOSE=1  also stream the console to stdout
#      VUB_GUEST_RECONNECT=1  QEMU reconnects to the socket (reconnect-ms=100) and
#                           the guest only runs the long fio-reconnect workload
#                           (VUB_GUEST_RECONNECT_SECS, default 20)
#      VUB_GUEST_MIGRATE=1  the guest runs the same long fio workload as with
#                           VUB_GUEST_RECONNECT (without QEMU reconnecting), for a
#                           live migration under it (tests/e2e_migration.rs)
#      VUB_GUEST_QMP=PATH   a QMP socket at PATH (server, no wait)
#      VUB_GUEST_INCOMING=URI  start as a migration destination (-incoming URI)
#      VUB_GUEST_RESIZE=1   run the online-resize step: after the other steps the
#                         guest prints "E2E-WAIT-RESIZE <sectors>" and waits (20 s)
#                         for the disk to grow; whoever runs this script must then
#                         grow it through the daemon's control socket
#                         (tests/e2e_guest.rs does)
#
# SIGTERM/SIGINT/SIGHUP stop qemu too (the caller's cleanup path).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
GUEST=${VUB_GUEST_DIR:-$REPO/ci/.cache/guest}
TIMEOUT=${VUB_GUEST_TIMEOUT:-300}

log() { echo "[guest/run] $*" >&2; }
die() { echo "[guest/run] ERROR: $*" >&2; exit 2; }

[[ $# -eq 1 ]] || die "usage: $0 SOCKET"
SOCK=$1
[[ -S "$SOCK" ]] || die "$SOCK is not a unix socket (is the backend running?)"
for f in vmlinuz initramfs.cpio.gz; do
    [[ -s "$GUEST/$f" ]] || die "missing $GUEST/$f (run ci/guest/build.sh)"
done
QEMU=$(command -v qemu-system-x86_64 || true)
[[ -n "$QEMU" ]] || die "qemu-system-x86_64 not found (run ci/setup.sh)"

LOG=${VUB_GUEST_LOG:-$(mktemp "${TMPDIR:-/tmp}/vub-guest.XXXXXX.log")}
: >"$LOG"

# KVM only when the CPU really has hardware virtualisation; otherwise TCG.
accel=${VUB_GUEST_ACCEL:-}
if [[ -z "$accel" ]]; then
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -w /dev/kvm ]]; then
        accel=kvm
    else
        accel=tcg
    fi
fi
case "$accel" in
    kvm) cpu=host ;;
    tcg) cpu=max ;;
    *) die "VUB_GUEST_ACCEL must be kvm or tcg" ;;
esac

# The guest's own watchdog fires first, so a hang is reported with the stuck
# step and the kernel's blocked-task dump rather than as a bare qemu timeout.
guest_timeout=$(( TIMEOUT > 90 ? TIMEOUT - 60 : (TIMEOUT > 20 ? TIMEOUT - 10 : TIMEOUT) ))

# The long fio workload, for a reconnect or a migration test.
workload=${VUB_GUEST_RECONNECT:-${VUB_GUEST_MIGRATE:-}}
extra=()
[[ -n "${VUB_GUEST_QMP:-}" ]] && extra+=(-qmp "unix:$VUB_GUEST_QMP,server=on,wait=off")
[[ -n "${VUB_GUEST_INCOMING:-}" ]] && extra+=(-incoming "$VUB_GUEST_INCOMING")

# The guest's RAM must be a shared memfd so the backend can map it.
# shellcheck disable=SC2054  # commas are part of qemu option values
args=(
    -nodefaults -no-user-config
    -machine q35,memory-backend=mem
    -accel "$accel" -cpu "$cpu"
    -smp 2 -m 512M
    -object memory-backend-memfd,id=mem,size=512M,share=on
    -chardev "socket,id=vub,path=$SOCK${VUB_GUEST_RECONNECT:+,reconnect-ms=100}"
    -device vhost-user-blk-pci,chardev=vub,num-queues=2
    -kernel "$GUEST/vmlinuz"
    -initrd "$GUEST/initramfs.cpio.gz"
    -append "console=ttyS0 panic=-1 loglevel=4 mitigations=off E2E_TIMEOUT=$guest_timeout E2E_RESIZE=${VUB_GUEST_RESIZE:-0} E2E_RECONNECT=${workload:+1} E2E_RECONNECT_SECS=${VUB_GUEST_RECONNECT_SECS:-20}"
    -display none -monitor none
    -serial "file:$LOG"
    -no-reboot
    "${extra[@]}"
)

log "booting guest ($accel, timeout ${TIMEOUT}s), console log: $LOG"
start=$(date +%s)
tail_pid=
if [[ "${VUB_GUEST_VERBOSE:-0}" == 1 ]]; then
    tail -n +1 -f "$LOG" &
    tail_pid=$!
fi
rc=0
# qemu runs in the background so that a signal to this script (a test's cleanup)
# is handled at once and takes qemu down with it: `timeout` puts qemu in its own
# process group, out of reach of a signal to ours.
qemu_pid=
# shellcheck disable=SC2317  # called by the trap
stop_all() {
    [[ -n "$qemu_pid" ]] && kill -TERM "$qemu_pid" 2>/dev/null
    [[ -n "$tail_pid" ]] && kill "$tail_pid" 2>/dev/null
    exit 143
}
trap stop_all TERM INT HUP
# qemu's own messages (e.g. a refused socket) go to the log as well.
timeout --kill-after=10 "$TIMEOUT" "$QEMU" "${args[@]}" 2>"$LOG.qemu" </dev/null &
qemu_pid=$!
wait "$qemu_pid" || rc=$?
qemu_pid=
trap - TERM INT HUP
[[ -n "$tail_pid" ]] && kill "$tail_pid" 2>/dev/null
elapsed=$(( $(date +%s) - start ))
if [[ -s "$LOG.qemu" ]]; then
    { echo "----- qemu stderr -----"; cat "$LOG.qemu"; } >>"$LOG"
fi
rm -f "$LOG.qemu"

# The console uses CRLF line endings.
grep -a '^E2E-' "$LOG" | tr -d '\r' >&2 || true
if (( rc == 124 || rc == 137 )); then
    log "qemu timed out after ${TIMEOUT}s"
elif (( rc != 0 )); then
    log "qemu exited with status $rc"
fi
if grep -aq '^E2E-RESULT PASS' "$LOG"; then
    log "PASS in ${elapsed}s"
    exit 0
fi
log "FAIL after ${elapsed}s; last 60 lines of $LOG:"
tail -n 60 "$LOG" | tr -d '\r' >&2
exit 1
