#!/usr/bin/env bash
# Build (or reuse) a cached Debian guest for attach tests: QEMU 10 from
# bookworm-backports, the 6.12 cloud kernel (nbd.ko, ublk_drv.ko as modules)
# and a debootstrapped bookworm root image. Nothing on the host is installed or
# upgraded: packages are fetched with a private apt configuration and unpacked
# with dpkg-deb -x under the cache directory.
#
# Usage: scripts/guest/build.sh [--force]
# See scripts/guest/README.md.
set -euo pipefail

# Bump GUEST_VERSION whenever anything below changes what ends up in the cache.
GUEST_VERSION=3
SUITE=bookworm
ROOT_PACKAGES=kmod,e2fsprogs,xfsprogs,util-linux,mount,procps,python3,fio
ROOTFS_SIZE=${BLOCKGATE_GUEST_ROOTFS_SIZE:-1536M}
STAMP="blockgate-guest v${GUEST_VERSION} suite=${SUITE} qemu=10+ kernel=cloud-6.12+ packages=${ROOT_PACKAGES} rootfs=${ROOTFS_SIZE}"

GUEST_DIR=${BLOCKGATE_GUEST_DIR:-$HOME/.cache/blockgate/guest}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "guest/build.sh: error: $*" >&2; exit 1; }
log() { echo "guest/build.sh: $*" >&2; }

FORCE=0
case "${1:-}" in
  "") ;;
  --force) FORCE=1 ;;
  -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
  *) die "unknown argument '$1' (usage: build.sh [--force])" ;;
esac

# Disk signature of rootfs.img's MBR: the kernel finds the root as
# PARTUUID=<signature>-01 (see run.sh).
ROOT_DISK_SIGNATURE=b10c6a7e

# write_mbr IMAGE SIGNATURE(hex) START_SECTOR SECTORS: an MBR with one Linux partition.
write_mbr() {
  local img=$1 sig=$((16#$2)) start=$3 count=$4
  le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
  {
    printf '%b\x00\x00' "$(le32 "$sig")"            # 440: disk signature; 444: reserved
    printf '\x00\xfe\xff\xff\x83\xfe\xff\xff'       # 446: entry 1: inactive, CHS unused, type 83
    printf '%b%b' "$(le32 "$start")" "$(le32 "$count")" #      first LBA, sector count
    head -c 48 /dev/zero                            # entries 2-4: empty
    printf '\x55\xaa'                               # 510: boot signature
  } | dd of="$img" bs=1 seek=440 conv=notrunc status=none
}

# --- step timing -------------------------------------------------------------
T_TOTAL=$(date +%s)
T_STEP=0
STEP_NAME=""
TIMINGS=()
step() {
  step_end
  STEP_NAME=$1
  T_STEP=$(date +%s)
  log "== $STEP_NAME"
}
step_end() {
  if [[ -n $STEP_NAME ]]; then
    local took=$(( $(date +%s) - T_STEP ))
    TIMINGS+=("$(printf '%4ds  %s' "$took" "$STEP_NAME")")
    log "   done in ${took}s"
    STEP_NAME=""
  fi
}

# --- cache check -------------------------------------------------------------
mkdir -p "$GUEST_DIR"
exec 9>"$GUEST_DIR/.lock"
flock 9 || die "cannot lock $GUEST_DIR/.lock"

up_to_date() {
  [[ -f $GUEST_DIR/stamp && $(cat "$GUEST_DIR/stamp") == "$STAMP" ]] &&
    [[ -f $GUEST_DIR/rootfs.img && -f $GUEST_DIR/vmlinuz && -f $GUEST_DIR/guest.env ]] &&
    [[ -x $GUEST_DIR/prefix/usr/bin/qemu-system-x86_64 && -x $GUEST_DIR/prefix/usr/bin/qemu-img ]]
}
if [[ $FORCE == 0 ]] && up_to_date; then
  log "cached guest in $GUEST_DIR is up to date ($(grep '^KERNEL_RELEASE=' "$GUEST_DIR/guest.env"))"
  exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot and device nodes need it)"
for tool in apt-get apt-cache dpkg-deb dpkg-query chroot mkfs.ext4 flock; do
  command -v "$tool" >/dev/null || die "'$tool' not found on the host"
done
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] ||
  die "/usr/share/keyrings/debian-archive-keyring.gpg missing (package debian-archive-keyring)"

avail_mb=$(( $(df -Pk "$GUEST_DIR" | awk 'NR == 2 { print $4 }') / 1024 ))
((avail_mb >= 2048)) || die "only ${avail_mb} MiB free in $GUEST_DIR; the build needs about 2 GiB"

log "building guest in $GUEST_DIR (stamp: $STAMP)"
rm -f "$GUEST_DIR/stamp"
rm -rf "$GUEST_DIR/prefix" "$GUEST_DIR/debs" "$GUEST_DIR/root" "$GUEST_DIR/rootfs.img" \
  "$GUEST_DIR/rootfs.img.tmp" "$GUEST_DIR/vmlinuz" "$GUEST_DIR/guest.env"
PREFIX=$GUEST_DIR/prefix
DEBS=$GUEST_DIR/debs
ROOT=$GUEST_DIR/root
mkdir -p "$PREFIX" "$DEBS"

# --- 1. private apt configuration ---------------------------------------------
step "private apt configuration and apt-get update"
# Use the same Debian mirror as the host (only package registries are reachable).
detect_mirror() {
  local f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    # one-line format: "deb [opts] URI suite comp"; deb822 format: "URIs: URI"
    uri=$(sed -nE \
      -e 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([a-z]+:\/\/[^[:space:]]+\/debian\/?)[[:space:]].*/\2/p' \
      -e 's/^URIs:[[:space:]]*([a-z]+:\/\/[^[:space:]]+\/debian\/?)([[:space:]].*)?$/\1/p' "$f" | head -n1)
    if [[ -n $uri ]]; then echo "${uri%/}"; return; fi
  done
  echo "http://deb.debian.org/debian"
}
MIRROR=${BLOCKGATE_GUEST_MIRROR:-$(detect_mirror)}
log "   mirror: $MIRROR"
APT_DIR=$GUEST_DIR/apt
mkdir -p "$APT_DIR/etc/sources.list.d" "$APT_DIR/state/lists/partial" "$APT_DIR/cache/archives/partial"
cat >"$APT_DIR/etc/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-backports main
EOF
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APT_DIR/etc/sources.list"
  -o "Dir::Etc::SourceParts=$APT_DIR/etc/sources.list.d"
  -o "Dir::State=$APT_DIR/state"
  -o "Dir::Cache=$APT_DIR/cache"
  -o "APT::Sandbox::User=root"
  -o "Acquire::Languages=none"
)
papt() { apt-get "${APT_OPTS[@]}" "$@"; }
pcache() { apt-cache "${APT_OPTS[@]}" "$@"; }
papt -q update >"$GUEST_DIR/apt-update.log" 2>&1 ||
  { cat "$GUEST_DIR/apt-update.log" >&2; die "private apt-get update failed"; }

# Version of PKG that the private apt would take from RELEASE ("" = default).
candidate() {
  local pkg=$1 release=${2:-}
  if [[ -n $release ]]; then
    pcache madison "$pkg" | awk -F'|' -v r="$release" '$3 ~ " "r"/" { gsub(/ /, "", $2); print $2; exit }'
  else
    pcache policy "$pkg" | awk '/Candidate:/ { print $2; exit }'
  fi
}
# Depends field of PKG=VERSION, one "name [op version]" per line (first alternative).
depends_of() {
  pcache show "$1=$2" | awk '/^Depends:/ { sub(/^Depends: */, ""); print; exit }' |
    tr ',' '\n' | sed -E 's/\|.*//; s/^ +//; s/ +$//; s/:any//' | grep -v '^$' || true
}
fetch() { # fetch PKG=VERSION ... into $DEBS
  (cd "$DEBS" && papt -q download "$@" >>"$GUEST_DIR/apt-download.log" 2>&1) ||
    { tail -n 20 "$GUEST_DIR/apt-download.log" >&2; die "apt-get download $* failed"; }
}

# --- 2. QEMU and the libraries the host lacks ----------------------------------
step "download and unpack qemu-system-x86 and qemu-utils from $SUITE-backports"
QEMU_VERSION=$(candidate qemu-system-x86 "$SUITE-backports")
[[ -n $QEMU_VERSION ]] || die "qemu-system-x86 not found in $SUITE-backports"
[[ $QEMU_VERSION =~ ^1:([0-9]+)\. && ${BASH_REMATCH[1]} -ge 10 ]] ||
  die "qemu-system-x86 in $SUITE-backports is $QEMU_VERSION, expected 10.x or newer"
QEMU_DATA_VERSION=$(candidate qemu-system-data "$SUITE-backports")
SEABIOS_VERSION=$(candidate seabios "$SUITE-backports")
[[ -n $SEABIOS_VERSION ]] || SEABIOS_VERSION=$(candidate seabios)
QEMU_UTILS_VERSION=$(candidate qemu-utils "$SUITE-backports")
log "   qemu-system-x86 $QEMU_VERSION, qemu-system-data $QEMU_DATA_VERSION, qemu-utils $QEMU_UTILS_VERSION, seabios $SEABIOS_VERSION"
# qemu-utils gives run.sh a qemu-img that does not depend on the host's packages.
PKGS=("qemu-system-x86=$QEMU_VERSION" "qemu-system-data=$QEMU_DATA_VERSION" "qemu-utils=$QEMU_UTILS_VERSION"
  "seabios=$SEABIOS_VERSION")

# Library dependencies (transitively) that the host does not have in a
# sufficient version. Non-library dependencies (qemu-system-common, ipxe-qemu,
# ...) are not needed to boot a kernel with -nic none.
host_satisfies() { # NAME [OP VERSION]
  local name=$1 op=${2:-} want=${3:-} have
  have=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$name" 2>/dev/null || true)
  [[ $have == "ii "* ]] || return 1
  [[ -z $op ]] && return 0
  dpkg --compare-versions "${have#ii  }" "$op" "$want"
}
declare -A SEEN=()
queue=("qemu-system-x86 $QEMU_VERSION" "qemu-utils $QEMU_UTILS_VERSION")
while ((${#queue[@]})); do
  read -r pkg ver <<<"${queue[0]}"
  queue=("${queue[@]:1}")
  while read -r name rest; do
    [[ $name == lib* ]] || continue
    [[ -z ${SEEN[$name]:-} ]] || continue
    SEEN[$name]=1
    op="" want=""
    if [[ $rest =~ ^\(([<>=]+)\ ([^\)]+)\)$ ]]; then op=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}; fi
    case $op in "<<") op=lt ;; "<=") op=le ;; "=") op=eq ;; ">=") op=ge ;; ">>") op=gt ;; esac
    if host_satisfies "$name" "$op" "$want"; then continue; fi
    v=$(candidate "$name")
    [[ -n $v ]] || die "library package $name (needed by $pkg) not found"
    log "   host lacks $name ${op:+($op $want)}: fetching $v"
    PKGS+=("$name=$v")
    queue+=("$name $v")
  done < <(depends_of "$pkg" "$ver")
done
fetch "${PKGS[@]}"
for deb in "$DEBS"/*.deb; do dpkg-deb -x "$deb" "$PREFIX"; done
QEMU=$PREFIX/usr/bin/qemu-system-x86_64
QEMU_LIBS=$PREFIX/usr/lib/x86_64-linux-gnu
for bin in "$QEMU" "$PREFIX/usr/bin/qemu-img"; do
  missing=$(LD_LIBRARY_PATH=$QEMU_LIBS ldd "$bin" | grep -F 'not found' || true)
  [[ -z $missing ]] || die "$(basename "$bin") still misses libraries:"$'\n'"$missing"
  LD_LIBRARY_PATH=$QEMU_LIBS "$bin" --version >/dev/null ||
    die "the unpacked $bin does not run (LD_LIBRARY_PATH=$QEMU_LIBS)"
done
log "   $(LD_LIBRARY_PATH=$QEMU_LIBS "$QEMU" --version | head -n1)"

# --- 3. kernel ------------------------------------------------------------------
step "download and unpack linux-image-cloud-amd64 from $SUITE-backports"
META_VERSION=$(candidate linux-image-cloud-amd64 "$SUITE-backports")
[[ -n $META_VERSION ]] || die "linux-image-cloud-amd64 not found in $SUITE-backports"
dpkg --compare-versions "$META_VERSION" ge 6.12 ||
  die "linux-image-cloud-amd64 in $SUITE-backports is $META_VERSION, expected 6.12 or newer"
KPKG=$(depends_of linux-image-cloud-amd64 "$META_VERSION" | awk '/^linux-image-/ { print $1; exit }')
[[ -n $KPKG ]] || die "cannot find the kernel package that linux-image-cloud-amd64 $META_VERSION depends on"
KDIR=$GUEST_DIR/kernel
rm -rf "$KDIR"
mkdir -p "$KDIR"
(cd "$KDIR" && papt -q download "$KPKG=$META_VERSION" >>"$GUEST_DIR/apt-download.log" 2>&1) ||
  die "apt-get download $KPKG failed"
dpkg-deb -x "$KDIR"/linux-image-*.deb "$KDIR/x"
KERNEL_RELEASE=${KPKG#linux-image-}
[[ -f $KDIR/x/boot/vmlinuz-$KERNEL_RELEASE && -d $KDIR/x/lib/modules/$KERNEL_RELEASE ]] ||
  die "unexpected layout of $KPKG (no boot/vmlinuz-$KERNEL_RELEASE or lib/modules/$KERNEL_RELEASE)"
for opt in CONFIG_EXT4_FS=y CONFIG_BLK_DEV_NVME=y CONFIG_BLK_DEV_NBD=m CONFIG_BLK_DEV_UBLK=m; do
  grep -qx "$opt" "$KDIR/x/boot/config-$KERNEL_RELEASE" ||
    die "kernel $KERNEL_RELEASE lacks $opt, which the guest relies on"
done
log "   kernel $KERNEL_RELEASE"

# --- 4. root file system -------------------------------------------------------
step "debootstrap --variant=minbase $SUITE"
if command -v debootstrap >/dev/null; then
  DEBOOTSTRAP=(debootstrap)
else
  # Unpack debootstrap privately instead of installing it on the host.
  fetch "debootstrap=$(candidate debootstrap)"
  mkdir -p "$GUEST_DIR/debootstrap"
  dpkg-deb -x "$DEBS"/debootstrap_*.deb "$GUEST_DIR/debootstrap"
  DEBOOTSTRAP=(env "DEBOOTSTRAP_DIR=$GUEST_DIR/debootstrap/usr/share/debootstrap"
    "$GUEST_DIR/debootstrap/usr/sbin/debootstrap")
fi
"${DEBOOTSTRAP[@]}" --variant=minbase --include="$ROOT_PACKAGES" "$SUITE" "$ROOT" "$MIRROR" \
  >"$GUEST_DIR/debootstrap.log" 2>&1 ||
  { tail -n 30 "$GUEST_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $GUEST_DIR/debootstrap.log)"; }

step "install kernel modules, init and configuration into the root"
mkdir -p "$ROOT/lib/modules"
cp -a "$KDIR/x/lib/modules/$KERNEL_RELEASE" "$ROOT/lib/modules/"
cp -a "$KDIR/x/boot/config-$KERNEL_RELEASE" "$KDIR/x/boot/System.map-$KERNEL_RELEASE" "$ROOT/boot/"
chroot "$ROOT" /sbin/depmod -a "$KERNEL_RELEASE"
for m in nbd ublk_drv loop xfs; do
  chroot "$ROOT" /sbin/modprobe -S "$KERNEL_RELEASE" --show-depends "$m" >/dev/null ||
    die "module $m is not resolvable in the guest root"
done
install -m 0755 "$SCRIPT_DIR/guest-init.sh" "$ROOT/sbin/blockgate-init"
echo blockgate-guest >"$ROOT/etc/hostname"
: >"$ROOT/etc/fstab"
# Trim what a test never needs.
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
  "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/*
cp "$KDIR/x/boot/vmlinuz-$KERNEL_RELEASE" "$GUEST_DIR/vmlinuz"
log "   root tree: $(du -sh "$ROOT" | cut -f1)"

step "mkfs.ext4 -d root -> rootfs.img ($ROOTFS_SIZE, one MBR partition)"
# The root is a partition so that the kernel can find it by PARTUUID: NVMe
# namespaces are probed asynchronously, so nvme0n1/nvme0n2 may swap between boots.
IMG=$GUEST_DIR/rootfs.img.tmp
rm -f "$IMG"
truncate -s "$ROOTFS_SIZE" "$IMG"
img_sectors=$(( $(stat -c %s "$IMG") / 512 ))
part_start=2048
part_sectors=$(( img_sectors - part_start ))
write_mbr "$IMG" "$ROOT_DISK_SIGNATURE" "$part_start" "$part_sectors"
mkfs.ext4 -q -F -L bgroot -E "offset=$(( part_start * 512 ))" -d "$ROOT" "$IMG" "$(( part_sectors / 2 ))k" ||
  die "mkfs.ext4 -d $ROOT failed"
mv "$IMG" "$GUEST_DIR/rootfs.img"

step "clean up"
rm -rf "$ROOT" "$DEBS" "$KDIR"
cat >"$GUEST_DIR/guest.env" <<EOF
# written by scripts/guest/build.sh; read by scripts/guest/run.sh
KERNEL_RELEASE=$KERNEL_RELEASE
KERNEL_PACKAGE_VERSION=$META_VERSION
QEMU_VERSION=$QEMU_VERSION
MIRROR=$MIRROR
ROOT_PARTUUID=$ROOT_DISK_SIGNATURE-01
EOF
echo "$STAMP" >"$GUEST_DIR/stamp"
step_end

log "timings:"
printf '   %s\n' "${TIMINGS[@]}" >&2
log "total: $(( $(date +%s) - T_TOTAL ))s; guest cache: $GUEST_DIR ($(du -sh "$GUEST_DIR" | cut -f1))"
