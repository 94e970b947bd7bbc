#!/usr/bin/env bash
# Install everything the test suite (incl. the end-to-end guest test) needs on
# a fresh Debian bookworm machine of the project's kind.
#
# Idempotent: when everything is already present it makes no apt calls at all
# and finishes in well under a second.
#
# Important: qemu-utils 10.x (qemu-img, qemu-storage-daemon) comes from
# bookworm-backports.  qemu-system-x86 MUST be installed from the same suite;
# installing it from plain bookworm would downgrade/remove qemu-utils 10.
set -euo pipefail

log() { echo "[ci/setup] $*" >&2; }
die() { echo "[ci/setup] ERROR: $*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive

# Packages from the normal bookworm suite.
BASE_PKGS=(busybox-static fio e2fsprogs cpio gzip xz-utils zstd util-linux kmod shellcheck strace)
# Packages that must come from bookworm-backports (matching qemu-utils 10).
BPO_PKGS=(qemu-system-x86 qemu-utils)

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo available"
    SUDO=(sudo)
fi

# is_installed PKG: true if dpkg reports PKG as fully installed.
is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

# qemu_major BINARY: print the major version of a qemu binary (empty if absent).
qemu_major() {
    command -v "$1" >/dev/null 2>&1 || return 0
    "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]\+\)\..*/\1/p' | head -n1
}

# The backports source, on the same mirror host the existing Debian sources use.
ensure_backports_source() {
    if grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    local mirror
    # Take the first Debian (non-security) mirror URL from the existing sources,
    # one-line ("deb URL suite ...") or deb822 ("URIs: URL") style.
    mirror=$(grep -rhsE '^[^#]*(^deb |URIs:)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
        | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)
    mirror=${mirror%/}
    [[ -n "$mirror" ]] || mirror="http://deb.debian.org/debian"
    log "adding bookworm-backports source ($mirror)"
    echo "deb $mirror bookworm-backports main" | "${SUDO[@]}" tee /etc/apt/sources.list.d/backports.list >/dev/null
}

missing=()
for p in "${BASE_PKGS[@]}"; do
    is_installed "$p" || missing+=("$p")
done

need_bpo=0
for p in "${BPO_PKGS[@]}"; do
    is_installed "$p" || need_bpo=1
done
[[ "$(qemu_major qemu-img)" -ge 10 ]] 2>/dev/null || need_bpo=1
[[ "$(qemu_major qemu-system-x86_64)" -ge 10 ]] 2>/dev/null || need_bpo=1

if (( ${#missing[@]} > 0 || need_bpo )); then
    ensure_backports_source
    # apt lists are needed for any install; update exactly once per run.
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    if (( ${#missing[@]} > 0 )); then
        log "installing: ${missing[*]}"
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    if (( need_bpo )); then
        log "installing from bookworm-backports: ${BPO_PKGS[*]}"
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}"
    fi
else
    log "all packages present; skipping apt"
fi

# Rust components used by CI (formatting and lints).
if command -v rustup >/dev/null 2>&1; then
    installed=$(rustup component list --installed 2>/dev/null || true)
    for c in rustfmt clippy; do
        if ! grep -q "^$c" <<<"$installed"; then
            log "rustup component add $c"
            rustup component add "$c"
        fi
    done
else
    log "warning: rustup not found; not checking rustfmt/clippy"
fi

# Loud post-conditions: the QEMU pair must be version 10 and match.
img_major=$(qemu_major qemu-img)
sys_major=$(qemu_major qemu-system-x86_64)
[[ "$img_major" == 10 ]] || die "qemu-img is not version 10 (got '${img_major:-none}'): $(qemu-img --version 2>&1 | head -n1)"
[[ "$sys_major" == 10 ]] || die "qemu-system-x86_64 is not version 10 (got '${sys_major:-none}')"
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon missing"
[[ -x /bin/busybox ]] || die "busybox-static did not install /bin/busybox"
log "ok: $(qemu-img --version | head -n1); $(qemu-system-x86_64 --version | head -n1)"
