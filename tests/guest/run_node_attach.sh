#!/usr/bin/env bash
# Host side: builds the gateway, prepares a job with tests/guest/node_attach.sh and runs it in
# the test guest (scripts/guest/run.sh; needs root). Prints the guest console; the job's
# output lands in $JOB/out.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
JOB=${1:-$(mktemp -d /tmp/blockgate-node-attach.XXXXXX)}
(cd "$ROOT" && cargo build -p blockgate-gateway)
mkdir -p "$JOB"
# Debug info is most of the binary's size; the guest needs none of it.
strip -o "$JOB/blockgate-gateway" "$TARGET/debug/blockgate-gateway"
cp "$ROOT/tests/guest/node_attach.sh" "$JOB/run.sh"
status=0
"$ROOT/scripts/guest/run.sh" --timeout "${TIMEOUT:-900}" "$JOB" || status=$?
echo "job: $JOB (result: $(cat "$JOB/out/result.txt" 2>/dev/null || echo none))"
exit "$status"
