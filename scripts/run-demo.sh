#!/usr/bin/env bash
# Builds the gateway (release) and serves a 1 GiB volume `demo` over NBD, in the foreground.
#
#   scripts/run-demo.sh [extra `blockgate-gateway serve` flags...]
#
# Data (write log, cache, and the embedded object store under `bucket/`) goes to
# ./blockgate-data, or to $BLOCKGATE_DATA_DIR. The gateway prints the volume's
# `nbd+unix://` URI; use it from another terminal (see README.md). Ctrl-C stops it; the write
# log stays on disk and is replayed at the next start.
#
# Extra flags are passed to `serve`, e.g. a real S3 bucket (credentials from AWS_ACCESS_KEY_ID
# and AWS_SECRET_ACCESS_KEY):
#   scripts/run-demo.sh --store s3://bucket/prefix --s3-endpoint http://127.0.0.1:9000 --s3-path-style
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/blockgate/target}
DATA_DIR=${BLOCKGATE_DATA_DIR:-./blockgate-data}

echo "==> building blockgate-gateway (release; the first build takes several minutes)"
cargo build --release --manifest-path "$ROOT/Cargo.toml" -p blockgate-gateway --bin blockgate-gateway

echo "==> serving volume demo (1 GiB) from $DATA_DIR; Ctrl-C to stop"
exec "$CARGO_TARGET_DIR/release/blockgate-gateway" serve \
    --data-dir "$DATA_DIR" \
    --volume demo=1GiB \
    "$@"
