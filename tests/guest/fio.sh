#!/usr/bin/env bash
# fio through a blockgate kernel device (/dev/nbdN, attached with `blockgate-gateway node
# attach`) against a baseline measured in the same run: a loop device (direct I/O) over a file
# on the same guest disk that holds the gateway's data directory and bucket. Run in the test
# guest (see csi_node_job.sh). Writes out/fio.json (one object per job and device) and prints
# a table. Under QEMU/TCG both are slow; the ratio is what matters.
#
# FIO_RUNTIME (seconds per job, default 20) and FIO_SIZE (default 256M) tune it.
set -euo pipefail

BIN=${BLOCKGATE_GATEWAY_BIN:-$PWD/blockgate-gateway}
OUT=${OUT_DIR:-$PWD/out}
RUNTIME=${FIO_RUNTIME:-20}
SIZE=${FIO_SIZE:-256M}
WORK=/var/tmp/fio
DATA=$WORK/data
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK/bucket"

gw() { "$BIN" "$@" --data-dir "$DATA"; }

modprobe nbd nbds_max=8
modprobe loop
"$BIN" serve --attach-only --data-dir "$DATA" --store "$WORK/bucket" --no-metrics \
  >>"$OUT/gateway.log" 2>&1 &
GATEWAY_PID=$!
LOOP=""
cleanup() {
  [[ -z $LOOP ]] || losetup -d "$LOOP" 2>/dev/null || true
  gw node detach bench >/dev/null 2>&1 || true
  kill -TERM "$GATEWAY_PID" 2>/dev/null || true
  wait "$GATEWAY_PID" 2>/dev/null || true
}
trap cleanup EXIT
deadline=$((SECONDS + 120))
until gw node list >/dev/null 2>&1; do
  kill -0 "$GATEWAY_PID" 2>/dev/null || { echo "fio: the gateway exited at start"; exit 1; }
  ((SECONDS < deadline)) || { echo "fio: the gateway did not start"; exit 1; }
  sleep 0.2
done

gw volume create bench --size "$SIZE" >/dev/null
NBD=$(gw node attach bench --epoch 2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["device_path"])')
truncate -s "$SIZE" "$WORK/loop.img"
LOOP=$(losetup --find --show --direct-io=on "$WORK/loop.img")
echo "fio: nbd device $NBD, baseline loop device $LOOP over $WORK/loop.img (direct I/O)"

# name, then fio's job options. The sequential write goes first so the reads find data.
JOBS=(
  "seqwrite-1m --rw=write --bs=1M --iodepth=8"
  "randwrite-4k --rw=randwrite --bs=4k --iodepth=32"
  "randread-4k --rw=randread --bs=4k --iodepth=32"
)
for job in "${JOBS[@]}"; do
  read -r name options <<<"$job"
  for kind in loop nbd; do
    device=$LOOP
    [[ $kind == nbd ]] && device=$NBD
    # shellcheck disable=SC2086 # options is a list of fio flags
    fio --name="$name" --filename="$device" $options --ioengine=libaio --direct=1 \
      --size="$SIZE" --runtime="$RUNTIME" --time_based --group_reporting \
      --output-format=json --output="$OUT/$kind-$name.json"
  done
done

python3 - "$OUT" "$RUNTIME" "$SIZE" <<'PY'
import json, os, sys
out, runtime, size = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for name in ("seqwrite-1m", "randwrite-4k", "randread-4k"):
    for kind in ("loop", "nbd"):
        job = json.load(open(os.path.join(out, f"{kind}-{name}.json")))["jobs"][0]
        side = job["read"] if name.startswith("randread") else job["write"]
        rows.append({
            "job": name,
            "device": kind,
            "iops": round(side["iops"], 1),
            "bandwidth_mib_s": round(side["bw_bytes"] / (1 << 20), 2),
            "latency_mean_us": round(side["clat_ns"]["mean"] / 1000, 1),
            "latency_p99_us": round(side["clat_ns"]["percentile"]["99.000000"] / 1000, 1),
        })
json.dump({"runtime_s": runtime, "size": size, "results": rows},
          open(os.path.join(out, "fio.json"), "w"), indent=2)
print(f"{'job':<14} {'device':<6} {'IOPS':>9} {'MiB/s':>8} {'mean us':>9} {'p99 us':>9}")
for r in rows:
    print(f"{r['job']:<14} {r['device']:<6} {r['iops']:>9} {r['bandwidth_mib_s']:>8} "
          f"{r['latency_mean_us']:>9} {r['latency_p99_us']:>9}")
PY
