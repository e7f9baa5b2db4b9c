#!/usr/bin/env bash
# Self test of the test guest: builds it if needed, boots it with a job that
# checks the nbd and ublk_drv modules, ext4 and xfs on a loop device, fio and
# python3, and verifies on the host the result file the job wrote to out/.
#
# Usage: scripts/guest/selftest.sh [--timeout SECONDS]
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "guest/selftest.sh: FAILED: $*" >&2; exit 1; }
log() { echo "guest/selftest.sh: $*" >&2; }

t0=$(date +%s)
"$SCRIPT_DIR/build.sh" || die "build.sh failed"
t_build=$(( $(date +%s) - t0 ))

JOB=$(mktemp -d "${TMPDIR:-/tmp}/blockgate-selftest.XXXXXX")
trap 'rm -rf "$JOB"' EXIT

cat >"$JOB/run.sh" <<'GUEST'
# Runs inside the guest (bash, cwd /job, results to out/).
set -euo pipefail
result=out/result.txt
: >"$result"
ok() { echo "ok $*" | tee -a "$result"; }
skip() { echo "skip $*" | tee -a "$result"; }
quiet() { local out; out=$("$@" 2>&1) || { echo "$out"; echo "FAILED: $*" >&2; return 1; }; }

echo "kernel $(uname -r)" | tee -a "$result"

modprobe nbd nbds_max=4
[[ -b /dev/nbd0 ]] || { echo "no /dev/nbd0 after modprobe nbd" >&2; exit 1; }
[[ ! -e /dev/nbd4 ]] || { echo "nbds_max=4 was not honoured" >&2; exit 1; }
ok nbd "$(cat /sys/block/nbd0/size) sectors, $(ls -d /dev/nbd[0-9]* | wc -l) devices"

modprobe ublk_drv
[[ -c /dev/ublk-control ]] || { echo "no /dev/ublk-control after modprobe ublk_drv" >&2; exit 1; }
ok ublk_drv

# File systems on a loop device backed by a sparse file on the (overlay) root.
if modprobe loop && command -v losetup >/dev/null && losetup -f >/dev/null 2>&1; then
  img=/var/tmp/fs.img
  mkdir -p /mnt/t
  for fs in ext4 xfs; do
    rm -f "$img"
    truncate -s 512M "$img"
    dev=$(losetup --find --show "$img")
    if [[ $fs == ext4 ]]; then mkfs.ext4 -q "$dev"; else mkfs.xfs -q "$dev"; fi
    [[ $(blkid -o value -s TYPE "$dev") == "$fs" ]] || { echo "blkid does not see $fs on $dev" >&2; exit 1; }
    if [[ $fs == ext4 ]]; then quiet fsck.ext4 -fn "$dev"; else quiet xfs_repair -n "$dev"; fi
    mount -t "$fs" "$dev" /mnt/t
    echo "written on $fs" >/mnt/t/file
    # grow the backing file and the file system online
    truncate -s 768M "$img"
    losetup -c "$dev"
    if [[ $fs == ext4 ]]; then quiet resize2fs "$dev"; else quiet xfs_growfs /mnt/t; fi
    size_mb=$(( $(stat -f -c '%b*%S' /mnt/t) / 1048576 ))
    ((size_mb > 600)) || { echo "$fs did not grow ($size_mb MiB)" >&2; exit 1; }
    umount /mnt/t
    if [[ $fs == ext4 ]]; then quiet fsck.ext4 -fn "$dev"; else quiet xfs_repair -n "$dev"; fi
    mount -t "$fs" "$dev" /mnt/t
    [[ $(cat /mnt/t/file) == "written on $fs" ]]
    umount /mnt/t
    losetup -d "$dev"
    ok "$fs mkfs/blkid/fsck/mount/grow to ${size_mb} MiB"
  done
  rm -f "$img"
else
  skip "loop devices unavailable: ext4/xfs checks not run"
fi

fio --name=t --filename=/var/tmp/fio.dat --size=16M --rw=randrw --bs=4k --ioengine=psync \
  --verify=crc32c --time_based=0 --output-format=terse >/dev/null
rm -f /var/tmp/fio.dat
ok "fio $(fio --version)"

python3 -c 'import json, os; json.dump({"uname": os.uname().release}, open("out/python.json", "w"))'
ok "python3 $(python3 -c 'import sys; print(sys.version.split()[0])')"
echo done >>"$result"
GUEST

log "running the self-test job in the guest"
t1=$(date +%s)
status=0
"$SCRIPT_DIR/run.sh" "$@" "$JOB" || status=$?
t_run=$(( $(date +%s) - t1 ))
[[ $status == 0 ]] || die "the guest job exited with status $status"

result=$JOB/out/result.txt
[[ -f $result ]] || die "the job's out/result.txt was not copied back"
for want in "kernel 6." "ok nbd" "ok ublk_drv" "ok fio" "ok python3" "done"; do
  grep -q "^$want" "$result" || die "out/result.txt lacks '$want':"$'\n'"$(cat "$result")"
done
grep -q '"uname": "6\.' "$JOB/out/python.json" || die "out/python.json is wrong"
grep -q '^skip' "$result" && log "note: $(grep '^skip' "$result")"
log "PASSED: $(head -n1 "$result"); build/check ${t_build}s, boot-to-exit ${t_run}s"
