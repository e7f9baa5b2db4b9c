#!/usr/bin/env bash
# The job's run.sh for tests/tests/guest_csi_node.rs (it copies this file into the job as
# run.sh, beside the binaries, the test executable, node_attach.sh and fio.sh). Runs every part
# in one boot, each with its own out/<part>/, even when an earlier one failed, and exits
# non-zero when any failed. out/parts.txt has one line per part: name, exit status, seconds.
set -uo pipefail

OUT=${OUT_DIR:-$PWD/out}
mkdir -p "$OUT"
export BLOCKGATE_GATEWAY_BIN=$PWD/blockgate-gateway
export BLOCKGATE_CSI_BIN=$PWD/blockgate-csi
export BLOCKGATE_BLOCKSTORE_BIN=$PWD/blockgate-blockstore
export RUST_BACKTRACE=1

# Every part attaches through nbd; the gateway adds devices beyond these when it needs more.
modprobe nbd nbds_max=8 || { echo "modprobe nbd failed"; exit 1; }

failed=0
run_part() {
  local name=$1
  shift
  mkdir -p "$OUT/$name"
  echo "=== $name: $*"
  local started=$SECONDS status=0
  OUT_DIR=$OUT/$name "$@" 2>&1 | tee "$OUT/$name/console.log" || status=$?
  echo "$name $status $((SECONDS - started))" >> "$OUT/parts.txt"
  echo "=== $name: exit status $status after $((SECONDS - started)) s"
  # Each part leaves its work under /var/tmp; the root overlay has about 1.2 GiB free.
  rm -rf /var/tmp/node-attach /var/tmp/guest-csi /var/tmp/fio
  ((status == 0)) || failed=1
}

run_part node_attach bash ./node_attach.sh
run_part csi_node ./guest_csi_node --exact scenarios_in_the_guest --nocapture --test-threads 1
run_part fio bash ./fio.sh
exit "$failed"
