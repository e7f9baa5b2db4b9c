#!/usr/bin/env bash
# Run a job inside the cached blockgate test guest (QEMU/TCG, Debian bookworm,
# 6.12 cloud kernel with nbd and ublk_drv modules).
#
# Usage: scripts/guest/run.sh [--timeout SECONDS] JOB_DIR [-- EXTRA_QEMU_ARGS...]
#
# JOB_DIR holds a run.sh (executed with bash inside the guest, with JOB_DIR as
# its working directory, mounted at /job) and whatever it needs (binaries built
# on the host run as they are: the guest is Debian 12 too). Whatever the job
# writes to /job/out (also $OUT_DIR) is copied back to JOB_DIR/out. The exit
# status is run.sh's; 124 if the guest timed out, 125 if it stopped without
# finishing the job (kernel panic, missing job disk, ...).
# See scripts/guest/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_DIR=${BLOCKGATE_GUEST_DIR:-$HOME/.cache/blockgate/guest}
TIMEOUT=${BLOCKGATE_GUEST_TIMEOUT:-600}
MEM=${BLOCKGATE_GUEST_MEM:-2G}
SMP=${BLOCKGATE_GUEST_SMP:-2}
JOB_FREE_MB=${BLOCKGATE_GUEST_JOB_FREE_MB:-512}
APPEND_EXTRA=${BLOCKGATE_GUEST_APPEND:-}
# qboot (from qemu-system-data) boots -kernel faster and quieter than SeaBIOS;
# BLOCKGATE_GUEST_BIOS=bios-256k.bin selects SeaBIOS.
BIOS=${BLOCKGATE_GUEST_BIOS:-qboot.rom}

die() { echo "guest/run.sh: error: $*" >&2; exit 2; }
log() { echo "guest/run.sh: $*" >&2; }
usage() { sed -n '5,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

JOB_DIR=""
EXTRA_QEMU=()
while (($#)); do
  case $1 in
    --timeout) [[ $# -ge 2 ]] || usage; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#--timeout=}; shift ;;
    -h|--help) usage ;;
    --) shift; EXTRA_QEMU=("$@"); break ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z $JOB_DIR ]] || die "only one JOB_DIR may be given"; JOB_DIR=$1; shift ;;
  esac
done
[[ -n $JOB_DIR ]] || usage
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -gt 0 ]] || die "--timeout must be a positive number of seconds, not '$TIMEOUT'"
[[ -d $JOB_DIR ]] || die "job directory '$JOB_DIR' does not exist"
JOB_DIR=$(cd "$JOB_DIR" && pwd)
[[ -f $JOB_DIR/run.sh ]] || die "'$JOB_DIR' has no run.sh"
for tool in mkfs.ext4 debugfs timeout tar; do
  command -v "$tool" >/dev/null || die "'$tool' not found on the host"
done

# Build the guest if it is missing or stale (a no-op when the cache is current).
"$SCRIPT_DIR/build.sh" || die "building the guest failed"
# shellcheck source=/dev/null
source "$GUEST_DIR/guest.env"
QEMU=$GUEST_DIR/prefix/usr/bin/qemu-system-x86_64
export LD_LIBRARY_PATH=$GUEST_DIR/prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blockgate-guest.XXXXXX")
# shellcheck disable=SC2329 # used by the trap
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# --- the job disk: JOB_DIR (without out/) plus an empty out/ -----------------
mkdir "$WORK/job"
tar -C "$JOB_DIR" --exclude=./out -cf - . | tar -C "$WORK/job" -xf -
mkdir -p "$WORK/job/out"
content_mb=$(( $(du -sm "$WORK/job" | cut -f1) ))
job_mb=$(( content_mb + content_mb / 5 + 64 + JOB_FREE_MB ))
truncate -s "${job_mb}M" "$WORK/job.img"
mkfs.ext4 -q -F -L BGJOB -E root_owner=0:0 -d "$WORK/job" "$WORK/job.img" ||
  die "mkfs.ext4 -d of the job directory failed"
rm -rf "$WORK/job"

# --- the root disk: a throw-away copy-on-write overlay ---------------------------
"$GUEST_DIR/prefix/usr/bin/qemu-img" create -q -f qcow2 -b "$GUEST_DIR/rootfs.img" -F raw "$WORK/root.qcow2" ||
  die "qemu-img create of the root overlay failed"

# shellcheck disable=SC2054 # the commas belong to -drive/-device options
QEMU_ARGS=(
  -L "$GUEST_DIR/prefix/usr/share/qemu" -L "$GUEST_DIR/prefix/usr/share/seabios"
  -bios "$BIOS" -machine q35 -accel tcg -cpu max -m "$MEM" -smp "$SMP"
  -nographic -no-reboot -nic none
  -kernel "$GUEST_DIR/vmlinuz"
  -append "console=ttyS0 root=PARTUUID=$ROOT_PARTUUID rw rootfstype=ext4 init=/sbin/blockgate-init panic=-1 quiet $APPEND_EXTRA"
  # NVMe is the only disk driver built into this kernel (virtio-blk, AHCI are
  # modules): one controller, two namespaces. Their names (nvme0n1, nvme0n2)
  # are not stable, so the root is found by PARTUUID and the job disk by label.
  -drive "file=$WORK/root.qcow2,format=qcow2,if=none,id=root,cache=unsafe,discard=unmap"
  -drive "file=$WORK/job.img,format=raw,if=none,id=job,cache=writeback"
  -device nvme,id=nvme0,serial=blockgate
  -device nvme-ns,bus=nvme0,drive=root,nsid=1
  -device nvme-ns,bus=nvme0,drive=job,nsid=2
  "${EXTRA_QEMU[@]}"
)

log "booting guest (kernel $KERNEL_RELEASE, timeout ${TIMEOUT}s, job $JOB_DIR)"
start=$(date +%s)
stdin=/dev/null
[[ -t 0 ]] && stdin=/dev/stdin
set +e
timeout --foreground -k 10 "$TIMEOUT" "$QEMU" "${QEMU_ARGS[@]}" <"$stdin"
qemu_status=$?
set -e
[[ -t 1 ]] && stty sane 2>/dev/null
elapsed=$(( $(date +%s) - start ))

# --- results ---------------------------------------------------------------------
guest_status=$(debugfs -R 'cat /exit-status' "$WORK/job.img" 2>/dev/null | tr -d '[:space:]' || true)
rm -rf "$JOB_DIR/out"
debugfs -R "rdump /out $JOB_DIR" "$WORK/job.img" >/dev/null 2>"$WORK/rdump.err" || true
[[ -d $JOB_DIR/out ]] || { cat "$WORK/rdump.err" >&2; log "warning: could not copy out/ back from the job disk"; }

if [[ $qemu_status == 124 || $qemu_status == 137 ]]; then
  log "FAILED: the guest did not finish within ${TIMEOUT}s (killed; out/ copied as far as written)"
  exit 124
fi
if [[ $qemu_status != 0 ]]; then
  log "FAILED: qemu exited with status $qemu_status after ${elapsed}s"
  exit 125
fi
if [[ ! $guest_status =~ ^[0-9]+$ ]]; then
  log "FAILED: the guest stopped after ${elapsed}s without finishing the job (kernel panic or init failure? see the console above)"
  exit 125
fi
log "guest finished in ${elapsed}s; run.sh exited with status $guest_status; out/ -> $JOB_DIR/out"
exit "$guest_status"
