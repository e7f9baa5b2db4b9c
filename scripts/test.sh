#!/usr/bin/env bash
# The blockgate test command: installs what the tests need (once), then runs every check.
#
#   scripts/test.sh
#
# On a fresh Debian 12 machine with Rust (rustup) as root or with sudo, it installs:
#   - apt: libnbd-bin nbdkit fio python3-libnbd qemu-utils g++ wget python3-venv (skipped when all
#     are present; wget is for the debootstrap that scripts/guest/build.sh unpacks for the guest
#     tests, python3-venv for the venv of scripts/validate-crds.sh)
#   - cargo-nextest, s3s-fs 0.14.1 (the S3 server the tests start), cargo-fuzz (when missing)
# and then runs, in order:
#   1. cargo fmt --all -- --check
#   2. cargo clippy --workspace --all-targets --all-features -- -D warnings
#   3. scripts/validate-crds.sh: crds/*.yaml as Kubernetes 1.33 CRDs (kubernetes-validate), the
#      examples against their schemas; its Python venv is created once (PyPI, ~10 s) and reused
#   4. a 30 s fuzz smoke of the NBD request decoder (driver/nbd/fuzz, see its README)
#   5. cargo test --doc --workspace
#   6. cargo nextest run --workspace --all-features   (profile: .config/nextest.toml)
#      This includes the guest tests (tests/tests/guest_*.rs): as root they boot a QEMU guest
#      with a real kernel, building it first (network to the Debian mirror, ~2 min) unless
#      cached; see docs/guest-tests.md.
# Every check runs even when an earlier one fails; the script exits non-zero if any failed.
#
# Environment:
#   CARGO_TARGET_DIR          default $HOME/.cache/blockgate/target (shared by all checkouts)
#   BLOCKGATE_FUZZ_SECONDS    fuzz smoke duration, default 30; 0 skips it
#   BLOCKGATE_SKIP_INSTALL=1  do not install anything (fail later if something is missing)
#   BLOCKGATE_VENV            the venv of scripts/validate-crds.sh, default $HOME/.cache/blockgate/venv
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/blockgate/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-auto}
# `cargo install` puts binaries here; the tests look for s3s-fs on PATH.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
FUZZ_SECONDS=${BLOCKGATE_FUZZ_SECONDS:-30}
FUZZ_TARGET_DIR=${BLOCKGATE_FUZZ_TARGET_DIR:-$(dirname "$CARGO_TARGET_DIR")/fuzz-target}

APT_PACKAGES=(libnbd-bin nbdkit fio python3-libnbd qemu-utils g++ wget python3-venv)
S3S_FS_VERSION=0.14.1

section() {
    printf '\n\033[1m==> %s\033[0m\n' "$*"
}

die() {
    printf 'test.sh: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root or sudo to run: $*"
    fi
}

install_apt_packages() {
    local missing=()
    local package
    for package in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$package")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "apt packages present: ${APT_PACKAGES[*]}"
        return
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them by hand"
    echo "installing: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_rust_components() {
    local component
    for component in rustfmt clippy; do
        if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
            command -v rustup >/dev/null || die "cargo $component is missing and there is no rustup"
            rustup component add "$component"
        fi
    done
}

install_cargo_tools() {
    if cargo nextest --version >/dev/null 2>&1; then
        echo "cargo-nextest: $(cargo nextest --version 2>/dev/null | head -n1)"
    else
        cargo install cargo-nextest --locked
    fi
    if command -v s3s-fs >/dev/null; then
        echo "s3s-fs: $(command -v s3s-fs)"
    else
        cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked
    fi
    if [ "$FUZZ_SECONDS" != 0 ]; then
        if cargo fuzz --version >/dev/null 2>&1; then
            echo "cargo-fuzz: $(cargo fuzz --version 2>/dev/null | head -n1)"
        else
            cargo install cargo-fuzz --locked
        fi
    fi
}

FAILED=()
PASSED=()

# Runs one check, records its outcome, and carries on.
check() {
    local name=$1
    shift
    section "$name"
    echo "+ $*"
    local started=$SECONDS
    if "$@"; then
        PASSED+=("$name")
        echo "--> ok: $name ($((SECONDS - started)) s)"
    else
        FAILED+=("$name")
        echo "--> FAILED: $name ($((SECONDS - started)) s)"
    fi
}

fuzz_smoke() {
    # Stable rustc with RUSTC_BOOTSTRAP=1, as driver/nbd/fuzz/README.md documents.
    local command=(cargo fuzz run --target-dir "$FUZZ_TARGET_DIR" request_decoder --
        -max_total_time="$FUZZ_SECONDS")
    echo "+ (cd driver/nbd && RUSTC_BOOTSTRAP=1 ${command[*]})"
    (cd driver/nbd && RUSTC_BOOTSTRAP=1 "${command[@]}")
}

section "setup"
echo "repository: $ROOT"
echo "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
cargo --version
if [ "${BLOCKGATE_SKIP_INSTALL:-0}" = 1 ]; then
    echo "BLOCKGATE_SKIP_INSTALL=1: installing nothing"
else
    install_apt_packages
    install_rust_components
    install_cargo_tools
fi

check "format (cargo fmt --check)" cargo fmt --all -- --check
check "lint (cargo clippy -D warnings)" \
    cargo clippy --workspace --all-targets --all-features -- -D warnings
check "CRDs validate (kubernetes-validate)" scripts/validate-crds.sh
if [ "$FUZZ_SECONDS" != 0 ]; then
    check "fuzz smoke: NBD request decoder, ${FUZZ_SECONDS} s" fuzz_smoke
fi
check "doc tests" cargo test --doc --workspace --all-features
check "tests (cargo nextest)" cargo nextest run --workspace --all-features

# On success the last lines stay nextest's own summary and one line of ours, so that a reader
# of the closing lines (a person or CI) sees the test count.
if [ ${#FAILED[@]} -ne 0 ]; then
    section "summary"
    for name in "${PASSED[@]+"${PASSED[@]}"}"; do
        echo "ok      $name"
    done
    for name in "${FAILED[@]}"; do
        echo "FAILED  $name"
    done
    echo "test.sh: ${#FAILED[@]} check(s) failed"
    exit 1
fi
echo "test.sh: all ${#PASSED[@]} checks passed"
