#!/usr/bin/env bash
# Kernel attach through the node API, inside the test guest (scripts/guest/run.sh runs this
# as the job's run.sh; `run_node_attach.sh` on the host prepares the job and runs it).
#
# A volume is attached as /dev/nbdN, formatted, mounted and written; the gateway is killed
# (SIGKILL) while a writer fsyncs records, and restarted: the device must come back under
# the mount without an error, every record acknowledged by fsync must be there, and after
# unmount fsck must be clean. Then the volume is expanded online and detached.
set -euo pipefail

BIN=${BLOCKGATE_GATEWAY:-$PWD/blockgate-gateway}
OUT=${OUT_DIR:-$PWD/out}
WORK=/var/tmp/node-attach
DATA=$WORK/data
MNT=/mnt/vol
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK/bucket" "$MNT"

log() { echo "node_attach: $*"; }
fail() { echo "node_attach: FAIL: $*"; echo "FAIL: $*" > "$OUT/result.txt"; exit 1; }
gw() { "$BIN" "$@" --data-dir "$DATA"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

GATEWAY_PID=""
start_gateway() {
  "$BIN" serve --attach-only --data-dir "$DATA" --store "$WORK/bucket" --no-metrics \
    --seal-interval-ms 200 >>"$OUT/gateway.log" 2>&1 &
  GATEWAY_PID=$!
  local deadline=$((SECONDS + 120))
  until gw node list >/dev/null 2>&1; do
    kill -0 "$GATEWAY_PID" 2>/dev/null || fail "the gateway exited at start (see gateway.log)"
    ((SECONDS < deadline)) || fail "the gateway did not start"
    sleep 0.2
  done
}

modprobe nbd nbds_max=4
start_gateway
gw volume create vol --size 256MiB >/dev/null
ATTACHED=$(gw node attach vol --epoch 2)
echo "$ATTACHED" > "$OUT/attach.json"
DEV=$(echo "$ATTACHED" | json '["device_path"]')
log "attached at $DEV"
[[ $(blockdev --getsize64 "$DEV") == $((256 << 20)) ]] || fail "device size"
[[ $(cat "/sys/block/$(basename "$DEV")/backend") == "blockgate:vol" ]] || fail "backend identifier"
AGAIN=$(gw node attach vol --epoch 2 | json '["device_path"]')
[[ $AGAIN == "$DEV" ]] || fail "a second attach gave $AGAIN"

mkfs.ext4 -q "$DEV"
mount "$DEV" "$MNT"
dd if=/dev/urandom of="$MNT/before" bs=1M count=16 status=none
sync
BEFORE=$(sha256sum < "$MNT/before")

# A writer appending numbered 4 KiB records, each fsynced; it logs a number only once the
# fsync returned, so every logged number is an acknowledged, durable write.
cat > "$WORK/writer.py" <<'PY'
import os, sys, signal
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
acked = open(sys.argv[2], "w", buffering=1)
n = 0
while not stop:
    os.write(fd, n.to_bytes(8, "little") * 512)
    os.fsync(fd)
    acked.write(f"{n}\n")
    n += 1
PY
python3 "$WORK/writer.py" "$MNT/records" "$OUT/acked.txt" &
WRITER=$!
sleep 3
kill -9 "$GATEWAY_PID"
wait "$GATEWAY_PID" 2>/dev/null || true
log "gateway killed after $(wc -l < "$OUT/acked.txt") acknowledged records"
sleep 2
KILLED_AT=$(wc -l < "$OUT/acked.txt")
start_gateway
log "gateway restarted"
gw node stats vol > "$OUT/stats-after-restart.json"
# The writer resumes by itself once the device is back.
deadline=$((SECONDS + 120))
until (( $(wc -l < "$OUT/acked.txt") > KILLED_AT + 20 )); do
  kill -0 "$WRITER" 2>/dev/null || fail "the writer died (an I/O error under the mount?)"
  ((SECONDS < deadline)) || fail "writes did not resume after the restart"
  sleep 0.5
done
kill -TERM "$WRITER"
wait "$WRITER" || fail "the writer failed"
sync -f "$MNT" || fail "fsync after the restart"
ACKED=$(wc -l < "$OUT/acked.txt")
log "$ACKED records acknowledged in all"
python3 - "$MNT/records" "$ACKED" <<'PY' || fail "acknowledged records are missing or wrong"
import sys
data = open(sys.argv[1], "rb").read()
acked = int(sys.argv[2])
for n in range(acked):
    record = data[n * 4096:(n + 1) * 4096]
    if record != n.to_bytes(8, "little") * 512:
        sys.exit(f"record {n} of {acked} is wrong")
PY
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); assert not s['condition']['abnormal'], s" \
  "$OUT/stats-after-restart.json" || fail "stats after the restart say abnormal"

gw node expand vol 512MiB > "$OUT/expand.json"
[[ $(blockdev --getsize64 "$DEV") == $((512 << 20)) ]] || fail "the device did not grow"
resize2fs "$DEV" >>"$OUT/resize2fs.log" 2>&1 || fail "online resize2fs"

umount "$MNT"
fsck.ext4 -fn "$DEV" > "$OUT/fsck.log" 2>&1 || fail "fsck after the crash and restart (see fsck.log)"
mount "$DEV" "$MNT"
[[ $(sha256sum < "$MNT/before") == "$BEFORE" ]] || fail "data written before the crash changed"
umount "$MNT"

gw node detach vol
[[ $(gw node list) == "[]" ]] || fail "still listed after detach"
[[ ! -e /sys/block/$(basename "$DEV")/pid ]] || fail "the device is still connected"
kill -TERM "$GATEWAY_PID"
wait "$GATEWAY_PID" || true
echo ok > "$OUT/result.txt"
log ok
