#!/usr/bin/env bash
# Benchmarks the gateway beside its baselines, in one run on one disk (see
# /work/shared/BENCHMARKS.md and docs/benchmarks.md), and prints a markdown table.
#
#   scripts/bench.sh
#
# Starts, in a temporary directory: s3s-fs (the S3 server), the release gateway on it, and
# qemu-nbd over raw files (the local NBD baseline, --cache=none, and --cache=writeback as a
# second opinion). Rows:
#   (a)  4K random write, QD32, one FLUSH every 32 writes (nbd-load: exact cadence)
#   (a') the same with fio --fsync=32 (fio sends far more flushes; counted and shown)
#   (b)  4K random read, QD32, warm (region pre-written, uploaded, and read once)
#   (c)  1 MiB sequential write (twice the region, into a write log that holds it) and read,
#        QD8
#   (d)  upload from a backlog: N MiB written while s3s-fs is stopped, the gateway killed
#        (-9), s3s-fs and the gateway restarted; upload throughput from the restarted
#        gateway's `ready` until its log is empty, vs raw aws-sdk-s3 PUT (second opinion: the
#        earlier figure, from the first write until drained with S3 up)
#   (e)  cold read from S3 by a gateway with a fresh data directory, vs raw ranged GET (4 MiB
#        ranges, 4 at once; 8 MiB ranges 8 at once, the read-ahead's, as a second opinion)
#   (f)  memory of a gateway holding a 1 TiB volume after scattered 4K writes
#   (g)  snapshot cut time on that volume
#   (h)  1 MiB sequential writes sustained beyond the default write log, vs raw PUT (the bound)
#
# Settings (environment):
#   BENCH_RUNTIME=20              seconds per timed fio / nbd-load job
#   BENCH_SCATTERED_WRITES=1000000 4K writes for (f) and (g)
#   BENCH_REGION_MIB=1024         the volume / raw file size for (a)-(c)
#   BENCH_UPLOAD_MIB=1024         data for (d) and (e)
#   BENCH_WORK_DIR                where everything runs (default: a new temp directory; its
#                                 filesystem is the disk being measured)
#   BENCH_KEEP=1                  keep the work directory
#   BENCH_S3_CPUS                 CPUs the S3 server may use (taskset list; default: the last
#                                 one, standing in for a remote server's own CPUs; `all`: any)
#   BENCH_GATEWAY_FLAGS           extra `serve` flags for every gateway (e.g. --s3-sign-payload;
#                                 the PUT baselines then sign too)
#   BENCH_ROWS=abcdefgh           the rows to run, by letter, in groups: a-c run together, d-e
#                                 together (e reads what d wrote), f-g together, h alone
# Output: the table on stdout and in target/bench/results.md; raw JSON in target/bench/raw/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/blockgate/target}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export RUST_BACKTRACE=0

RUNTIME=${BENCH_RUNTIME:-20}
SCATTERED_WRITES=${BENCH_SCATTERED_WRITES:-1000000}
REGION_MIB=${BENCH_REGION_MIB:-1024}
UPLOAD_MIB=${BENCH_UPLOAD_MIB:-1024}
ROWS_WANTED=${BENCH_ROWS:-abcdefgh}
read -r -a GATEWAY_FLAGS <<<"${BENCH_GATEWAY_FLAGS:-}"
# The S3 server stands for a remote one, which does not take the gateway's CPU: by default it
# runs on the last CPU only (taskset), so that its own work (s3s-fs spends about 3 core-seconds
# per GiB stored, mostly MD5) cannot crowd out the client side; the gateway, the baselines and
# the tools run anywhere. BENCH_S3_CPUS=all lets it run on every CPU, as before 2026-12-06.
S3_CPUS=${BENCH_S3_CPUS:-$(($(nproc) - 1))}
S3_PIN=()
if [ "$S3_CPUS" != all ] && [ "$(nproc)" -gt 1 ]; then
    S3_PIN=(taskset -c "$S3_CPUS")
else
    S3_CPUS=all
fi
# The PUT baseline sends the request the gateway sends: by default an unsigned payload with
# its CRC32C (--s3-sign-payload in BENCH_GATEWAY_FLAGS: a signed one). The other kind is a
# second sample, so the table shows what payload signing itself costs.
if [[ " ${GATEWAY_FLAGS[*]} " == *" --s3-sign-payload "* ]]; then
    SAME_SHAPE=() OTHER_SHAPE=(--unsigned-payload) SAME_LABEL="payload signed (SHA-256)" OTHER_LABEL="unsigned payload + CRC32C"
else
    SAME_SHAPE=(--unsigned-payload) OTHER_SHAPE=() SAME_LABEL="unsigned payload + CRC32C" OTHER_LABEL="payload signed (SHA-256), the SDK's default"
fi
# want LETTERS: true when any of the rows LETTERS was asked for.
want() { [[ $ROWS_WANTED == *[$1]* ]]; }
WORK=${BENCH_WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/blockgate-bench.XXXXXX")}
mkdir -p "$WORK"
OUT=$ROOT/target/bench
RAW=$OUT/raw
rm -rf "$RAW"
mkdir -p "$RAW"
ROWS=$RAW/rows.jsonl
: >"$ROWS"
HELPER=(python3 "$ROOT/scripts/bench_helper.py")
BUCKET=bench
export AWS_ACCESS_KEY_ID=blockgate-bench
export AWS_SECRET_ACCESS_KEY=blockgate-bench-secret
export AWS_REGION=us-east-1
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
INVOCATION="BENCH_S3_CPUS=$S3_CPUS BENCH_GATEWAY_FLAGS='${GATEWAY_FLAGS[*]}' BENCH_ROWS=$ROWS_WANTED BENCH_RUNTIME=$RUNTIME BENCH_SCATTERED_WRITES=$SCATTERED_WRITES BENCH_REGION_MIB=$REGION_MIB BENCH_UPLOAD_MIB=$UPLOAD_MIB scripts/bench.sh"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
calc() { python3 -c "import sys; print(format(eval(sys.argv[1]), sys.argv[2]))" "$1" "${2:-.1f}"; }

for tool in fio qemu-nbd nbdcopy s3s-fs python3 cargo; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/test.sh once (it installs the tools)"
done

# Processes this script started, by PID; stopped on exit.
STARTED=()
cleanup() {
    local pid
    for pid in "${STARTED[@]+"${STARTED[@]}"}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]+"${STARTED[@]}"}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "${BENCH_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        echo "kept $WORK" >&2
    fi
}
trap cleanup EXIT
trap 'exit 143' INT TERM

log "building (release)"
cargo build --release -p blockgate-gateway -p blockgate-bench >&2
BIN=$CARGO_TARGET_DIR/release
GATEWAY=$BIN/blockgate-gateway
NBD_LOAD=$BIN/nbd-load
S3_BASELINE=$BIN/s3-baseline

wait_for() { # DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${seconds}s waiting for $what"
        sleep 0.1
    done
}

# --- servers -----------------------------------------------------------------------------
S3_PORT=$("${HELPER[@]}" free-port)
S3_ENDPOINT=http://127.0.0.1:$S3_PORT
mkdir -p "$WORK/s3/$BUCKET"
S3_PID=
start_s3() { # (re)starts s3s-fs on $S3_PORT over $WORK/s3; sets S3_PID
    log "s3s-fs on $S3_ENDPOINT (root $WORK/s3)"
    "${S3_PIN[@]}" s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$WORK/s3" >>"$WORK/s3s-fs.log" 2>&1 &
    S3_PID=$!
    STARTED+=("$S3_PID")
    wait_for "s3s-fs" 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$S3_PORT"
}
forget_pid() { # PID: a process this script stopped itself is not stopped again on exit
    local pid kept=()
    for pid in "${STARTED[@]+"${STARTED[@]}"}"; do
        [ "$pid" = "$1" ] || kept+=("$pid")
    done
    STARTED=("${kept[@]+"${kept[@]}"}")
}
stop_s3() { # the S3 server goes away (row d's outage); its data stays in $WORK/s3
    log "stopping s3s-fs"
    kill -TERM "$S3_PID"
    wait "$S3_PID" 2>/dev/null || true
    forget_pid "$S3_PID"
    S3_PID=
}
start_s3

GATEWAY_PID=
METRICS_PORT=
GATEWAY_DIR=
# launch_gateway NAME PREFIX [serve flags...]: starts a gateway on s3://$BUCKET/PREFIX with
# data in $WORK/NAME, stdout in $WORK/NAME.out (it prints `ready` once serving) and its log in
# $WORK/NAME.log; sets GATEWAY_PID, GATEWAY_DIR and METRICS_PORT. Does not wait.
launch_gateway() {
    local name=$1 prefix=$2
    shift 2
    GATEWAY_DIR=$WORK/$name
    METRICS_PORT=$("${HELPER[@]}" free-port)
    log "gateway $name (store s3://$BUCKET/$prefix, metrics :$METRICS_PORT)"
    "$GATEWAY" serve --data-dir "$GATEWAY_DIR" \
        --store "s3://$BUCKET/$prefix" --s3-endpoint "$S3_ENDPOINT" --s3-region "$AWS_REGION" \
        --s3-path-style --metrics "127.0.0.1:$METRICS_PORT" \
        --seal-interval-ms 200 --gc-interval-seconds 0 "${GATEWAY_FLAGS[@]}" "$@" \
        >"$WORK/$name.out" 2>"$WORK/$name.log" &
    GATEWAY_PID=$!
    STARTED+=("$GATEWAY_PID")
}

# start_gateway NAME PREFIX [serve flags...]: launch_gateway, then wait until it is ready.
start_gateway() {
    launch_gateway "$@"
    wait_for "gateway $1 (see $WORK/$1.log)" 120 grep -q '^ready' "$WORK/$1.out"
}

stop_gateway() {
    kill -TERM "$GATEWAY_PID"
    wait "$GATEWAY_PID" || true
    forget_pid "$GATEWAY_PID"
}

metric() { "${HELPER[@]}" metric "$METRICS_PORT" "$@"; }

# Rows d and e time S3 traffic right after a gigabyte was written to this disk (the test data,
# a write log, s3s-fs's files), and the kernel writes such dirty pages back in the background,
# slowing whatever runs next. So each timed phase of rows d and e starts after a sync, the
# gateway's and the baselines' alike. (Without it, two PUT baselines run one after the other
# after row d differed by 30%, 330 and 430-485 MiB/s; with it, by 10-15%.)
settle() {
    log "sync (dirty pages: $(awk '/^Dirty:/ {print $2, $3}' /proc/meminfo))"
    sync
}

# s3_baseline NAME [s3-baseline flags...]: after a sync, raw PUTs and ranged GETs of
# BENCH_UPLOAD_MIB against the bucket, into $RAW/NAME.json.
s3_baseline() {
    local name=$1
    shift
    settle
    "$S3_BASELINE" --endpoint "$S3_ENDPOINT" --bucket "$BUCKET" --region "$AWS_REGION" \
        --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" \
        --total-mib "$UPLOAD_MIB" "$@" >"$RAW/$name.json"
}

drained() { # VOLUME: true once the volume's write log is empty (everything is in S3)
    [ "$(metric blockgate_volume_log_bytes "$1")" = 0 ] &&
        [ "$(metric blockgate_volume_upload_backlog_segments "$1")" = 0 ]
}

wait_drained() {
    wait_for "volume $1 to finish uploading" "${2:-900}" drained "$1"
}

# qemu-nbd over a raw file, the local NBD baseline.
start_qemu() { # NAME CACHE: sets QEMU_SOCKET
    local name=$1 cache=$2
    local file=$WORK/$name.raw
    QEMU_SOCKET=$WORK/$name.sock
    truncate -s "${REGION_MIB}M" "$file"
    log "qemu-nbd $name (--cache=$cache)"
    qemu-nbd -f raw --cache="$cache" --shared=8 -t -k "$QEMU_SOCKET" "$file" \
        >"$WORK/$name.log" 2>&1 &
    STARTED+=($!)
    wait_for "qemu-nbd $name" 30 test -S "$QEMU_SOCKET"
}

# --- (a)-(c): the block I/O path -----------------------------------------------------------
# Row c-write measures the write path (a burst the write log holds), so this gateway's log
# takes twice the region; row h measures what happens beyond the log, with the default.
IO_LOG_MIB=$((REGION_MIB * 2 + 64))
start_gateway gw-io io --volume "perf=${REGION_MIB}MiB" --volume "upload=${UPLOAD_MIB}MiB" \
    --cache-capacity "$((REGION_MIB * 2))MiB" --log-capacity "${IO_LOG_MIB}MiB"
GW_IO_DIR=$GATEWAY_DIR
GW_IO_PID=$GATEWAY_PID
start_qemu qemu-none none
QEMU_NONE=$QEMU_SOCKET
start_qemu qemu-wb writeback
QEMU_WB=$QEMU_SOCKET

# Targets: label, socket, export name.
TARGETS=(blockgate qemu-none qemu-wb)
declare -A SOCKET=([blockgate]=$GW_IO_DIR/nbd.sock [qemu-none]=$QEMU_NONE [qemu-wb]=$QEMU_WB)
declare -A EXPORT=([blockgate]=perf [qemu-none]= [qemu-wb]=)
uri() { echo "nbd+unix:///${EXPORT[$1]}?socket=${SOCKET[$1]}"; }

FIO_COMMON=(--size="${REGION_MIB}m" --output-format=json)
# run_fio NAME TARGET fio-args...: writes $RAW/NAME-TARGET.json
run_fio() {
    local name=$1 target=$2
    shift 2
    # --uri is an option of the nbd engine: it must follow --ioengine.
    fio --name="$name" --ioengine=nbd --uri="$(uri "$target")" "${FIO_COMMON[@]}" "$@" \
        --output="$RAW/$name-$target.json" >/dev/null
}

fio_figure() { "${HELPER[@]}" fio "$RAW/$1.json" "${@:2}"; }

if want abc; then
log "pre-writing the ${REGION_MIB} MiB region of each server"
for target in "${TARGETS[@]}"; do
    run_fio prewrite "$target" --rw=write --bs=1m --iodepth=8
done
wait_drained perf

log "(a) 4K random write QD32, one flush every 32 writes (nbd-load), ${RUNTIME}s each"
NBD_LOAD_ARGS=(--pattern randwrite --block-size 4096 --iodepth 32 --flush-every 32 --runtime "$RUNTIME")
flushes_before=$(metric blockgate_volume_flushes_total perf)
writes_before=$(metric blockgate_volume_writes_total perf)
for target in "${TARGETS[@]}"; do
    "$NBD_LOAD" --socket "${SOCKET[$target]}" --export "${EXPORT[$target]}" "${NBD_LOAD_ARGS[@]}" \
        >"$RAW/a-$target.json"
done
server_flushes=$(($(metric blockgate_volume_flushes_total perf) - flushes_before))
server_writes=$(($(metric blockgate_volume_writes_total perf) - writes_before))
iops() { "${HELPER[@]}" json "$RAW/$1.json" iops | xargs printf '%.0f'; }
"${HELPER[@]}" row "$ROWS" row=a unit=IOPS \
    what="4K random write, QD32, 1 flush per 32 writes" \
    blockgate="$(iops a-blockgate)" baseline="$(iops a-qemu-none)" baseline_label="qemu-nbd cache=none" \
    second="$(iops a-qemu-wb)" second_label="qemu-nbd cache=writeback" \
    notes="flushes/writes seen by the gateway: $server_flushes/$server_writes; p99 latency $("${HELPER[@]}" json "$RAW/a-blockgate.json" latency_us.p99 | xargs printf '%.0f') µs vs $("${HELPER[@]}" json "$RAW/a-qemu-none.json" latency_us.p99 | xargs printf '%.0f') µs" \
    command="\$CARGO_TARGET_DIR/release/nbd-load --socket SOCK --export NAME ${NBD_LOAD_ARGS[*]}"

log "(a') the same with fio --fsync=32 (fio's own flush cadence), ${RUNTIME}s each"
FIO_A=(--rw=randwrite --bs=4k --iodepth=32 --fsync=32 --time_based --runtime="$RUNTIME")
for target in "${TARGETS[@]}"; do
    run_fio a-fio "$target" "${FIO_A[@]}"
done
"${HELPER[@]}" row "$ROWS" row="a'" unit=IOPS \
    what="4K random write, QD32, fio --fsync=32" \
    blockgate="$(fio_figure a-fio-blockgate iops write)" \
    baseline="$(fio_figure a-fio-qemu-none iops write)" baseline_label="qemu-nbd cache=none" \
    second="$(fio_figure a-fio-qemu-wb iops write)" second_label="qemu-nbd cache=writeback" \
    notes="flushes/writes sent by fio: blockgate $(fio_figure a-fio-blockgate syncs write)/$(fio_figure a-fio-blockgate ios write), qemu-nbd $(fio_figure a-fio-qemu-none syncs write)/$(fio_figure a-fio-qemu-none ios write)" \
    command="fio --name=a --ioengine=nbd --uri=\$URI --size=${REGION_MIB}m ${FIO_A[*]}"

# Row c-write: the region written twice over, sequentially, into a write log that holds it
# (the burst a write-back gateway absorbs; beyond its log it goes at the upload rate: row h).
# The log is drained first, so row a's writes do not count against it.
wait_drained perf
log "(c) 1 MiB sequential write QD8, $((REGION_MIB * 2)) MiB each"
FIO_CW=(--rw=write --bs=1m --iodepth=8 --io_size="$((REGION_MIB * 2))m")
log_full_waits_before=$(metric blockgate_volume_log_full_waits_total perf)
for target in "${TARGETS[@]}"; do
    run_fio c-write "$target" "${FIO_CW[@]}"
done
c_write_log_full_waits=$(($(metric blockgate_volume_log_full_waits_total perf) - log_full_waits_before))

log "waiting for the gateway to upload, then reading the region once (warm-up)"
wait_drained perf
for target in "${TARGETS[@]}"; do
    nbdcopy "$(uri "$target")" null:
done
misses_before=$(metric blockgate_volume_cache_misses_total perf)

log "(b) 4K random read QD32 (warm), ${RUNTIME}s each"
FIO_B=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME")
for target in "${TARGETS[@]}"; do
    run_fio b "$target" "${FIO_B[@]}"
done
log "(c) 1 MiB sequential read QD8 (warm), ${RUNTIME}s each"
FIO_CR=(--rw=read --bs=1m --iodepth=8 --time_based --runtime="$RUNTIME")
for target in "${TARGETS[@]}"; do
    run_fio c-read "$target" "${FIO_CR[@]}"
done
read_misses=$(($(metric blockgate_volume_cache_misses_total perf) - misses_before))
"${HELPER[@]}" row "$ROWS" row=b unit=IOPS what="4K random read, QD32, warm" \
    blockgate="$(fio_figure b-blockgate iops read)" \
    baseline="$(fio_figure b-qemu-none iops read)" baseline_label="qemu-nbd cache=none" \
    second="$(fio_figure b-qemu-wb iops read)" second_label="qemu-nbd cache=writeback" \
    notes="blockgate reads come from its local read cache (region uploaded, then read once); cache misses during (b) and (c): $read_misses" \
    command="fio --name=b --ioengine=nbd --uri=\$URI --size=${REGION_MIB}m ${FIO_B[*]}"
"${HELPER[@]}" row "$ROWS" row=c-write unit=MiB/s what="1 MiB sequential write, QD8" \
    blockgate="$(fio_figure c-write-blockgate mibps write)" \
    baseline="$(fio_figure c-write-qemu-none mibps write)" baseline_label="qemu-nbd cache=none" \
    second="$(fio_figure c-write-qemu-wb mibps write)" second_label="qemu-nbd cache=writeback" \
    notes="no flushes; $((REGION_MIB * 2)) MiB into a ${IO_LOG_MIB} MiB write log (writes that waited for log space: $c_write_log_full_waits); the gateway uploads to S3 meanwhile; beyond the log: row h" \
    command="fio --name=c-write --ioengine=nbd --uri=\$URI --size=${REGION_MIB}m ${FIO_CW[*]}"
"${HELPER[@]}" row "$ROWS" row=c-read unit=MiB/s what="1 MiB sequential read, QD8, warm" \
    blockgate="$(fio_figure c-read-blockgate mibps read)" \
    baseline="$(fio_figure c-read-qemu-none mibps read)" baseline_label="qemu-nbd cache=none" \
    second="$(fio_figure c-read-qemu-wb mibps read)" second_label="qemu-nbd cache=writeback" \
    notes="local read cache, as in (b)" \
    command="fio --name=c-read --ioengine=nbd --uri=\$URI --size=${REGION_MIB}m ${FIO_CR[*]}"

fi

# --- (d) upload throughput ------------------------------------------------------------------
if want de; then
head -c "$((UPLOAD_MIB << 20))" /dev/urandom >"$WORK/upload.data"
settle

# Second opinion, the method of the first runs: from nbdcopy's first write until the log is
# empty, with s3s-fs up throughout. It includes the time nbdcopy takes to write the data
# locally, so it is not an upload figure on its own. The data stays in the bucket for row e.
log "(d, second opinion) ${UPLOAD_MIB} MiB written to volume upload, timed from the first write until drained"
uploaded_before=$(metric blockgate_volume_uploaded_bytes_total upload)
started=$(now)
nbdcopy --flush "$WORK/upload.data" "nbd+unix:///upload?socket=$GW_IO_DIR/nbd.sock"
written=$(now)
wait_drained upload
finished=$(now)
inline_uploaded=$(($(metric blockgate_volume_uploaded_bytes_total upload) - uploaded_before))
inline_drain_seconds=$(elapsed "$started" "$finished")
inline_write_seconds=$(elapsed "$started" "$written")
stop_gateway

# The figure: pure upload from a backlog. A gateway takes BENCH_UPLOAD_MIB while s3s-fs is
# stopped, so nothing can be uploaded; it is killed with SIGKILL right after nbdcopy returns
# (its write log stays on disk), s3s-fs comes back, and a new gateway process on the same data
# directory and bucket replays the log and uploads it. Timed from its `ready` line until its
# log is empty, by the helper (polls every 20 ms); bytes are what that process uploaded after
# `ready`. The log capacity is raised so that the whole backlog fits without waiting.
UP_FLAGS=(--log-capacity "$((UPLOAD_MIB * 2 + 64))MiB")
log "(d) upload from a backlog: ${UPLOAD_MIB} MiB written while s3s-fs is stopped, gateway killed, restarted, timed until drained"
start_gateway gw-up up --volume "upload=${UPLOAD_MIB}MiB" "${UP_FLAGS[@]}"
stop_s3
started=$(now)
nbdcopy --flush "$WORK/upload.data" "nbd+unix:///upload?socket=$GATEWAY_DIR/nbd.sock"
written=$(now)
backlog_write_seconds=$(elapsed "$started" "$written")
killed_uploaded=$(metric blockgate_volume_uploaded_bytes_total upload)
killed_log_bytes=$(metric blockgate_volume_log_bytes upload)
kill -KILL "$GATEWAY_PID"
wait "$GATEWAY_PID" 2>/dev/null || true
forget_pid "$GATEWAY_PID"
mv "$WORK/gw-up.out" "$WORK/gw-up.killed.out"
mv "$WORK/gw-up.log" "$WORK/gw-up.killed.log"
settle
start_s3
segments_before=$( (find "$WORK/s3/$BUCKET/up/volumes/upload/segments" -type f 2>/dev/null || true) | wc -l)
spawned=$(now)
launch_gateway gw-up up "${UP_FLAGS[@]}"
"${HELPER[@]}" drain-timer "$WORK/gw-up.out" "$METRICS_PORT" upload "$GATEWAY_PID" "$spawned" 900 \
    >"$RAW/d-drain.json"
stop_gateway
drain() { "${HELPER[@]}" json "$RAW/d-drain.json" "$1"; }

s3_baseline s3-baseline "${SAME_SHAPE[@]}"
# The read-ahead fetches 8 MiB pieces, 8 at once: the same GETs, as a second opinion for row e
# (and a second PUT sample, 8 at once).
s3_baseline s3-baseline-8x8 --get-range-mib 8 --concurrency 8 "${SAME_SHAPE[@]}"
s3_baseline s3-baseline-other "${OTHER_SHAPE[@]}"
s3_figure() { "${HELPER[@]}" json "$RAW/$1.json" "$2" | xargs printf '%.1f'; }
"${HELPER[@]}" row "$ROWS" row=d unit=MiB/s \
    what="upload to S3 from a backlog (${UPLOAD_MIB} MiB written while S3 was down; restarted gateway, from ready until the log is empty)" \
    blockgate="$(drain mib_per_second | xargs printf '%.1f')" \
    baseline="$(s3_figure s3-baseline put.mib_per_second)" \
    baseline_label="aws-sdk-s3 PUT, 8 MiB objects, 4 at once, $SAME_LABEL" \
    second="$(s3_figure s3-baseline-other put.mib_per_second)" \
    second_label="aws-sdk-s3 PUT, 8 MiB objects, 4 at once, $OTHER_LABEL" \
    notes="earlier method (from the first write until drained, S3 up): $(calc "$UPLOAD_MIB / $inline_drain_seconds") MiB/s; before the kill: $(calc "$killed_uploaded / 1048576") MiB uploaded, $segments_before segment objects in the bucket, $(calc "$killed_log_bytes / 1048576") MiB in the log (nbdcopy took ${backlog_write_seconds} s with s3s-fs down); restarted gateway: ready $(drain replay_seconds) s after start (log replay), $(calc "$(drain uploaded_at_ready) / 1048576") MiB uploaded before ready (not counted), then $(calc "$(drain uploaded_bytes) / 1048576") MiB in $(drain segments) segments in $(drain drain_seconds) s; from process start: $(calc "$(drain uploaded_at_drained) / 1048576 / $(drain start_to_drained_seconds)") MiB/s; earlier method: drained in ${inline_drain_seconds} s, nbdcopy done at ${inline_write_seconds} s, $(calc "$inline_uploaded / 1048576") MiB uploaded; second PUT sample (8 at once) $(s3_figure s3-baseline-8x8 put.mib_per_second) MiB/s" \
    command="stop s3s-fs; nbdcopy --flush upload.data \$URI; kill -9 the gateway; start s3s-fs; start the gateway on the same data dir; time from its ready line until blockgate_volume_log_bytes is 0 (bench_helper.py drain-timer)" \
    command="\$CARGO_TARGET_DIR/release/s3-baseline --endpoint http://127.0.0.1:PORT --bucket $BUCKET --region $AWS_REGION --access-key K --secret-key S --total-mib $UPLOAD_MIB ${SAME_SHAPE[*]}"

# --- (e) cold read from S3 --------------------------------------------------------------------
log "(e) cold read: a gateway with a fresh data directory reads volume upload from S3"
settle
start_gateway gw-cold io
started=$(now)
nbdcopy "nbd+unix:///upload?socket=$GATEWAY_DIR/nbd.sock" /dev/null
finished=$(now)
cold_seconds=$(elapsed "$started" "$finished")
"${HELPER[@]}" row "$ROWS" row=e unit=MiB/s what="cold sequential read from S3 (${UPLOAD_MIB} MiB)" \
    blockgate="$(calc "$UPLOAD_MIB / $cold_seconds")" \
    baseline="$(s3_figure s3-baseline get.mib_per_second)" \
    baseline_label="aws-sdk-s3 ranged GET, 4 MiB ranges, 4 at once" \
    second="$(s3_figure s3-baseline-8x8 get.mib_per_second)" \
    second_label="aws-sdk-s3 ranged GET, 8 MiB ranges, 8 at once (the read-ahead's)" \
    notes="fresh data directory on the same bucket: empty cache, every byte from s3s-fs; ${cold_seconds} s; cache lookups (reads and read-ahead): $(metric blockgate_volume_cache_hits_total upload) hits, $(metric blockgate_volume_cache_misses_total upload) misses" \
    command="nbdcopy \$URI /dev/null" \
    command="\$CARGO_TARGET_DIR/release/s3-baseline ... --total-mib $UPLOAD_MIB --get-range-mib 8 --concurrency 8"
stop_gateway

fi

# --- (h) sustained sequential writes beyond the write log --------------------------------------
# A write-back gateway takes a burst at local speed until its write log is full; from then on
# writes wait for uploads (DESIGN.md 9.6), so a stream longer than the log goes at the rate the
# log drains to S3. The baseline is that bound: raw PUTs to the same S3 server, sampled before
# and after the gateway's run (their mean; both in the notes). fio's ramp time covers filling
# the log, so the figure is the steady state.
if want h; then
H_RAMP=10
log "(h) sustained 1 MiB sequential writes into the default 1 GiB write log, ${RUNTIME}s after a ${H_RAMP}s ramp"
s3_baseline h-put-before "${SAME_SHAPE[@]}"
settle
start_gateway gw-sustain sustain --volume "stream=${REGION_MIB}MiB"
FIO_H=(--rw=write --bs=1m --iodepth=8 --time_based --ramp_time="$H_RAMP" --runtime="$RUNTIME")
fio --name=h --ioengine=nbd --uri="nbd+unix:///stream?socket=$GATEWAY_DIR/nbd.sock" \
    --size="${REGION_MIB}m" "${FIO_H[@]}" --output-format=json --output="$RAW/h-blockgate.json" >/dev/null
h_waits=$(metric blockgate_volume_log_full_waits_total stream)
h_uploaded=$(metric blockgate_volume_uploaded_bytes_total stream)
h_log=$(metric blockgate_volume_log_bytes stream)
stop_gateway
s3_baseline h-put-after "${SAME_SHAPE[@]}"
h_put_before=$("${HELPER[@]}" json "$RAW/h-put-before.json" put.mib_per_second)
h_put_after=$("${HELPER[@]}" json "$RAW/h-put-after.json" put.mib_per_second)
"${HELPER[@]}" row "$ROWS" row=h unit=MiB/s \
    what="1 MiB sequential write, QD8, sustained beyond the write log (steady state)" \
    blockgate="$(fio_figure h-blockgate mibps write)" \
    baseline="$(calc "($h_put_before + $h_put_after) / 2")" \
    baseline_label="aws-sdk-s3 PUT, 8 MiB objects, 4 at once, $SAME_LABEL: mean of the samples before and after" \
    notes="PUT samples $(calc "$h_put_before") and $(calc "$h_put_after") MiB/s; $(calc "$(fio_figure h-blockgate ios write) / 1024") GiB written in the timed part; writes that waited for log space: $h_waits; $(calc "$h_uploaded / 1073741824") GiB uploaded in all, $(calc "$h_log / 1048576") MiB in the log at the end (default --log-capacity 1GiB)" \
    command="fio --name=h --ioengine=nbd --uri=\$URI --size=${REGION_MIB}m ${FIO_H[*]}" \
    command="\$CARGO_TARGET_DIR/release/s3-baseline --endpoint http://127.0.0.1:PORT --bucket $BUCKET --region $AWS_REGION --access-key K --secret-key S --total-mib $UPLOAD_MIB ${SAME_SHAPE[*]}"
fi

# --- (f), (g) a 1 TiB volume after scattered writes ---------------------------------------------
if want fg; then
log "(f) 1 TiB volume, ${SCATTERED_WRITES} scattered 4K writes"
start_gateway gw-big big --volume big=1TiB --volume empty=1TiB
status_kib() { awk -v field="$1:" '$1 == field { print $2 }' "/proc/$GATEWAY_PID/status"; }
idle_rss_kib=$(status_kib VmRSS)
FIO_F=(--rw=randwrite --bs=4k --iodepth=32 --size=1t --number_ios="$SCATTERED_WRITES" --norandommap --randrepeat=0)
started=$(now)
fio --name=scattered --ioengine=nbd --uri="nbd+unix:///big?socket=$GATEWAY_DIR/nbd.sock" \
    "${FIO_F[@]}" --output-format=json --output="$RAW/f-scattered.json" >/dev/null
written=$(now)
wait_drained big 1800
drained_at=$(now)
hwm_kib=$(status_kib VmHWM)
rss_kib=$(status_kib VmRSS)
extents=$(metric blockgate_volume_map_extents big)
"${HELPER[@]}" row "$ROWS" row=f unit=MiB what="gateway memory, 1 TiB volume after ${SCATTERED_WRITES} scattered 4K writes (VmHWM)" \
    blockgate="$(calc "$hwm_kib / 1024")" \
    baseline="$(calc "$idle_rss_kib / 1024")" baseline_label="same gateway before the writes (VmRSS)" \
    better=lower \
    notes="VmRSS after upload $(calc "$rss_kib / 1024") MiB (growth $(calc "($rss_kib - $idle_rss_kib) / 1024") MiB); map extents $extents; target: map memory < 256 MiB; writes took $(elapsed "$started" "$written") s at $(fio_figure f-scattered iops write) IOPS, upload drained $(elapsed "$written" "$drained_at") s later" \
    command="fio --name=scattered --ioengine=nbd --uri=\$URI ${FIO_F[*]}"

log "(g) snapshot cut on the 1 TiB volume"
snapshot_cut() { # VOLUME SNAPSHOT: prints the seconds \`snapshot create\` took
    local started finished
    started=$(now)
    "$GATEWAY" snapshot create "$1" "$2" --data-dir "$GATEWAY_DIR" >"$RAW/g-$2.json"
    finished=$(now)
    elapsed "$started" "$finished"
}
big_cut=$(snapshot_cut big snap-big)
started=$(now)
"$GATEWAY" snapshot wait snap-big --data-dir "$GATEWAY_DIR" >/dev/null
ready_seconds=$(elapsed "$started" "$(now)")
empty_cut=$(snapshot_cut empty snap-empty)
"${HELPER[@]}" row "$ROWS" row=g unit=ms what="snapshot cut (\`snapshot create\` returns), 1 TiB volume with ${extents} extents" \
    blockgate="$(calc "$big_cut * 1000" .0f)" \
    baseline="$(calc "$empty_cut * 1000" .0f)" baseline_label="the same on an empty 1 TiB volume" \
    better=lower \
    notes="includes starting the CLI; snapshot ready $(calc "$ready_seconds * 1000" .0f) ms after the cut returned" \
    command="blockgate-gateway snapshot create big snap-big --data-dir DIR"

log "(f') the same gateway restarted: memory with the map loaded from the bucket and local state"
stop_gateway
start_gateway gw-big big
restart_rss_kib=$(status_kib VmRSS)
restart_hwm_kib=$(status_kib VmHWM)
restart_extents=$(metric blockgate_volume_map_extents big)
"${HELPER[@]}" row "$ROWS" row="f'" unit=MiB what="the same gateway restarted, volume open with its map (VmRSS)" \
    blockgate="$(calc "$restart_rss_kib / 1024")" \
    baseline="$(calc "$idle_rss_kib / 1024")" baseline_label="empty volumes, as in (f)" \
    better=lower \
    notes="VmHWM $(calc "$restart_hwm_kib / 1024") MiB during start; map extents $restart_extents; no write log or upload buffers in play, so the growth over the baseline is mostly the map" \
    command="blockgate-gateway serve ... (restart on the same data directory and bucket)"
stop_gateway

fi

# --- report -------------------------------------------------------------------------------
HEADER=$RAW/header.md
{
    echo "## Results $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- command: \`$INVOCATION\`"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ -z "$(git status --porcelain 2>/dev/null)" ] || echo ' (with uncommitted changes)')"
    echo "- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), disk: $(df -h --output=source,fstype "$WORK" | tail -n1 | xargs) (work dir $WORK)"
    echo "- load average (1, 5, 15 min) at the start: $LOAD_AT_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg) (the machine is shared; compare rows, not runs)"
    echo "- servers: s3s-fs $(s3s-fs --version 2>/dev/null | awk '{print $2}') (CPUs: $S3_CPUS), $(qemu-nbd --version | head -n1), $(fio --version)"
    echo "- gateway: release build, defaults except --seal-interval-ms 200, --gc-interval-seconds 0, --cache-capacity $((REGION_MIB * 2))MiB (row a-c gateway) and --log-capacity $((REGION_MIB * 2 + 64))MiB (row a-c gateway), --log-capacity $((UPLOAD_MIB * 2 + 64))MiB (row d gateway), defaults (row h gateway); store s3s-fs on the same disk"
}>"$HEADER"
"${HELPER[@]}" render "$ROWS" "$HEADER" | tee "$OUT/results.md"
echo >&2
echo "results: $OUT/results.md (raw JSON in $RAW)" >&2
