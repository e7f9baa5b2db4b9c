#!/bin/sh
# PID 1 of the blockgate test guest (installed as /sbin/blockgate-init by
# build.sh). Mounts the pseudo file systems and the job disk (label BGJOB),
# runs the job's run.sh, records its exit status in /job/exit-status, then
# powers the machine off. There is no network and no udev.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH HOME=/root TERM=dumb LANG=C.UTF-8

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
[ -d /sys/kernel/config ] && mount -t configfs configfs /sys/kernel/config 2>/dev/null
hostname blockgate-guest 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null

say() { echo "blockgate-init: $*"; }
halt_now() {
  sync
  echo o >/proc/sysrq-trigger
  sleep 30
  say "power off did not happen"
}

job_dev=$(blkid -L BGJOB 2>/dev/null || true)
mkdir -p /job
if [ -z "$job_dev" ] || ! mount -t ext4 "$job_dev" /job; then
  say "cannot mount the job disk ($job_dev); block devices:"
  cat /proc/partitions
  halt_now
fi
mkdir -p /job/out
rm -f /job/exit-status

if [ -f /job/run.sh ]; then
  say "running run.sh (kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime)s)"
  cd /job || exit 1
  BLOCKGATE_GUEST=1 JOB_DIR=/job OUT_DIR=/job/out bash /job/run.sh
  status=$?
  cd /
else
  say "the job disk has no run.sh"
  status=127
fi
say "run.sh exited with status $status (up $(cut -d' ' -f1 /proc/uptime)s)"
echo "$status" >/job/exit-status
sync
umount /job || { sync; say "could not unmount /job"; }
halt_now
