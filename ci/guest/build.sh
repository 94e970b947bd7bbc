#!/usr/bin/env bash
# Build the end-to-end test guest: a Debian cloud kernel plus a small
# initramfs (busybox, fio, mke2fs, the virtio modules and ci/guest/init).
#
# Outputs (in $VUB_GUEST_DIR, default <repo>/ci/.cache/guest):
#   vmlinuz               the kernel
#   initramfs.cpio.gz     the initramfs (newc, gzip)
#   stamp                 hash of all inputs; the build is skipped when it matches
#
# Needs: apt lists (apt-get update), busybox-static, fio, e2fsprogs,
# util-linux, cpio, kmod, xz-utils, zstd (run ci/setup.sh).  The kernel
# (linux-image-cloud-amd64's current candidate and the linux-image-<abi>
# package it depends on) is fetched with `apt-get download` into
# $VUB_GUEST_DIR/debs and unpacked with dpkg-deb -x; nothing is installed.
# The package ships no modules.dep, so depmod is run on the unpacked tree.
#
# Env: VUB_GUEST_DIR  output directory
#      VUB_GUEST_FORCE=1  rebuild even if up to date
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${VUB_GUEST_DIR:-$REPO/ci/.cache/guest}
INIT_SRC=$HERE/init

# Kernel modules the guest needs; their dependencies are added from
# modules.dep.  Whatever is built into the kernel (modules.builtin) is skipped.
# (Debian's 6.1 cloud kernel: virtio/virtio_pci/virtio_blk are modules, ext4
# and crc32c are built in.)
WANT_MODULES=(virtio_pci virtio_blk ext4 crc32c_generic)

# Host binaries copied into the initramfs together with their shared libraries
# (blkdiscard from util-linux: busybox's lacks -z, i.e. BLKZEROOUT).
BINARIES=(/usr/bin/fio /usr/sbin/mke2fs /usr/sbin/blkdiscard)

log() { echo "[guest/build] $*" >&2; }
die() { echo "[guest/build] ERROR: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb dpkg-query depmod cpio gzip ldd sha256sum flock xz zstd; do
    command -v "$tool" >/dev/null || die "missing '$tool' (run ci/setup.sh)"
done
BUSYBOX=$(command -v busybox || true)
[[ -n "$BUSYBOX" ]] || die "busybox not found (run ci/setup.sh: busybox-static)"
# Must be the static build: the guest starts it before any library exists.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static (ci/setup.sh)"
fi
for b in "${BINARIES[@]}"; do
    [[ -x "$b" ]] || die "missing $b (run ci/setup.sh)"
done

# Serialise concurrent builds (e.g. two test runs sharing the cache dir).
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# ---------------------------------------------------------------- freshness
# The kernel package the meta package currently points to.
KMETA=linux-image-cloud-amd64
candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
kmeta_ver=$(candidate "$KMETA")
if [[ ( -z "$kmeta_ver" || "$kmeta_ver" == "(none)" ) && $(id -u) -eq 0 ]]; then
    # Fresh machine whose apt lists were never fetched (or were cleaned).
    log "no apt candidate for $KMETA; running apt-get update"
    apt-get update -qq || true
    kmeta_ver=$(candidate "$KMETA")
fi
if [[ -z "$kmeta_ver" || "$kmeta_ver" == "(none)" ]]; then
    # No apt lists: fall back to an existing build if there is one.
    if [[ -s "$OUT/vmlinuz" && -s "$OUT/initramfs.cpio.gz" ]]; then
        log "apt lists unavailable; keeping the existing guest in $OUT"
        exit 0
    fi
    die "apt-cache knows no candidate for $KMETA; run 'apt-get update' (ci/setup.sh)"
fi

stamp=$(
    {
        echo "kernel $KMETA $kmeta_ver"
        echo "modules ${WANT_MODULES[*]}"
        dpkg-query -W -f='${Package} ${Version}\n' busybox-static fio e2fsprogs util-linux libc6 2>/dev/null || true
        sha256sum "${BASH_SOURCE[0]}" "$INIT_SRC"
    } | sha256sum | cut -d' ' -f1
)
if [[ "${VUB_GUEST_FORCE:-0}" != 1 && -s "$OUT/vmlinuz" && -s "$OUT/initramfs.cpio.gz" \
      && "$(cat "$OUT/stamp" 2>/dev/null)" == "$stamp" ]]; then
    log "guest is up to date in $OUT"
    exit 0
fi

WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- kernel
# Downloaded .debs are cached in $OUT/debs so a rebuild (e.g. after editing
# init) does not fetch them again.
DEBS=$OUT/debs
mkdir -p "$DEBS"
# download_failed PKG=VER: with stale apt lists the mirror may no longer have
# that version; refresh the lists once and start over, else give up.
download_failed() {
    if [[ -z "${VUB_GUEST_RETRIED:-}" && $(id -u) -eq 0 ]]; then
        log "apt-get download $1 failed; refreshing apt lists and retrying"
        apt-get update -qq || true
        rm -rf "$WORK"
        exec 9>&-  # release the build lock; the new run takes it again
        VUB_GUEST_RETRIED=1 exec bash "${BASH_SOURCE[0]}"
    fi
    die "apt-get download $1 failed (run 'apt-get update'?)"
}
meta_deb=$DEBS/${KMETA}_${kmeta_ver//:/%3a}_amd64.deb
if [[ ! -s "$meta_deb" ]]; then
    log "apt-get download $KMETA ($kmeta_ver)"
    # apt warns when it cannot drop privileges to _apt for the download dir;
    # that is harmless here.
    (cd "$DEBS" && apt-get download -q "$KMETA=$kmeta_ver" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
    [[ -s "$meta_deb" ]] || download_failed "$KMETA=$kmeta_ver"
fi
# The meta package depends on linux-image-<abi>-cloud-amd64 (= version),
# which holds the actual kernel.
dep=$(dpkg-deb -f "$meta_deb" Depends | tr ',' '\n' | grep -E '^ *linux-image-[0-9]' | head -n1)
kpkg=$(sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' <<<"$dep")
kpkg_ver=$(sed -n 's/.*(= *\([^)]*\)).*/\1/p' <<<"$dep")
[[ -n "$kpkg" && -n "$kpkg_ver" ]] || die "cannot find the kernel package in $KMETA's Depends ('$dep')"
kpkg_deb=$DEBS/${kpkg}_${kpkg_ver//:/%3a}_amd64.deb
if [[ ! -s "$kpkg_deb" ]]; then
    log "apt-get download $kpkg ($kpkg_ver)"
    (cd "$DEBS" && apt-get download -q "$kpkg=$kpkg_ver" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
    [[ -s "$kpkg_deb" ]] || download_failed "$kpkg=$kpkg_ver"
fi
# Drop older cached kernels.
for f in "$DEBS"/*.deb; do
    [[ "$f" == "$meta_deb" || "$f" == "$kpkg_deb" ]] || rm -f "$f"
done

log "unpacking $(basename "$kpkg_deb")"
KROOT=$WORK/kernel
dpkg-deb -x "$kpkg_deb" "$KROOT"
vmlinuz=$(find "$KROOT/boot" -name 'vmlinuz-*' | head -n1)
[[ -n "$vmlinuz" ]] || die "no kernel in $kpkg_deb"
kver=${vmlinuz##*/vmlinuz-}
# Modules live in lib/modules or (merged-/usr packages) usr/lib/modules.
if [[ -d "$KROOT/lib/modules/$kver" ]]; then
    MODBASE=$KROOT
elif [[ -d "$KROOT/usr/lib/modules/$kver" ]]; then
    mkdir -p "$KROOT/lib"
    ln -sfn ../usr/lib/modules "$KROOT/lib/modules"
    MODBASE=$KROOT
else
    die "no modules directory for $kver in $kpkg_deb"
fi
MODDIR=$MODBASE/lib/modules/$kver
# The package ships no modules.dep (its postinst runs depmod); make one.
depmod -b "$MODBASE" "$kver"

# ---------------------------------------------------------------- initramfs tree
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,mnt,run,etc,lib/modules,usr/bin,usr/sbin}

cp "$BUSYBOX" "$ROOT/bin/busybox"
install -m 0755 "$INIT_SRC" "$ROOT/init"
# The kernel opens /dev/console for init; mknod needs root (the kernel's
# built-in initramfs provides it otherwise).
if [[ $(id -u) -eq 0 ]]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
    mknod -m 666 "$ROOT/dev/null" c 1 3
fi

# copy_with_libs FILE: copy FILE and every shared library ldd lists for it,
# each to the same absolute path inside the initramfs (symlinks resolved).
copy_with_libs() {
    local f=$1 lib
    mkdir -p "$ROOT$(dirname "$f")"
    cp -L "$f" "$ROOT$f"
    while read -r lib; do
        [[ -e "$ROOT$lib" ]] && continue
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done < <(ldd "$f" | grep -oE '/[^ ]+' | sort -u)
}
for b in "${BINARIES[@]}"; do
    copy_with_libs "$b"
done
ln -sf mke2fs "$ROOT/usr/sbin/mkfs.ext4"
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$ROOT/etc/"
# A library search path for ld.so (some libs live in subdirectories).
ldconfig -r "$ROOT" 2>/dev/null || true

# ---------------------------------------------------------------- modules
# Resolve WANT_MODULES and their dependencies (depth-first, so every module
# comes after what it needs) and write the load order to /etc/modules.list.
declare -A MODPATH=() SEEN=()
ORDER=()
while IFS=: read -r path _; do
    name=${path##*/}
    name=${name%%.ko*}
    MODPATH[${name//-/_}]=$path
done <"$MODDIR/modules.dep"
declare -A BUILTIN=()
while read -r path; do
    name=${path##*/}
    name=${name%%.ko*}
    BUILTIN[${name//-/_}]=1
done <"$MODDIR/modules.builtin"

add_module() {
    local name=${1//-/_} path dep
    [[ -n "${SEEN[$name]:-}" ]] && return 0
    SEEN[$name]=1
    if [[ -n "${BUILTIN[$name]:-}" ]]; then
        log "module $name: built in"
        return 0
    fi
    path=${MODPATH[$name]:-}
    [[ -n "$path" ]] || die "module $name is neither built in nor in modules.dep of $kver"
    # shellcheck disable=SC2013  # modules.dep lists dependencies as words
    for dep in $(grep -E "^$path:" "$MODDIR/modules.dep" | cut -d: -f2-); do
        dep=${dep##*/}
        add_module "${dep%%.ko*}"
    done
    ORDER+=("$path")
}
for m in "${WANT_MODULES[@]}"; do
    add_module "$m"
done

: >"$ROOT/etc/modules.list"
for path in "${ORDER[@]}"; do
    base=${path##*/}
    plain=${base%%.ko*}.ko
    # Debian may compress modules; busybox insmod wants plain .ko files.
    case "$base" in
        *.ko) cp "$MODDIR/$path" "$ROOT/lib/modules/$plain" ;;
        *.ko.xz) xz -dc "$MODDIR/$path" >"$ROOT/lib/modules/$plain" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$path" >"$ROOT/lib/modules/$plain" ;;
        *.ko.gz) gzip -dc "$MODDIR/$path" >"$ROOT/lib/modules/$plain" ;;
        *) die "unknown module format: $path" ;;
    esac
    echo "$plain" >>"$ROOT/etc/modules.list"
done
log "modules (load order): $(tr '\n' ' ' <"$ROOT/etc/modules.list")"

# ---------------------------------------------------------------- pack
log "packing initramfs ($(du -sh "$ROOT" | cut -f1) uncompressed)"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0) \
    | gzip -1 >"$WORK/initramfs.cpio.gz"
cp "$vmlinuz" "$WORK/vmlinuz"
echo "$kver" >"$WORK/kernel-version"

# Install atomically-ish: outputs first, stamp last.
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
mv -f "$WORK/kernel-version" "$OUT/kernel-version"
echo "$stamp" >"$OUT/stamp"
log "built guest in $OUT: kernel $kver, initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)"
