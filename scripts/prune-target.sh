#!/usr/bin/env bash
# Deletes test and binary executables that newer builds have replaced in the shared
# CARGO_TARGET_DIR: every rebuild of a workspace crate with other dependencies leaves its old
# executables behind under another hash, and on a small disk they fill it within a day of
# work. Only the newest executable of each name is kept; cargo relinks anything it still
# needs, so this never breaks a build.
set -euo pipefail

deps="${CARGO_TARGET_DIR:-$HOME/.cache/blockgate/target}/debug/deps"
[ -d "$deps" ] || exit 0
declare -A newest
removed=0
while IFS= read -r path; do
    base=${path##*/}
    name=${base%-*}
    if [ -n "${newest[$name]:-}" ]; then
        rm -f -- "$path" "$path.d"
        removed=$((removed + 1))
    else
        newest[$name]=1
    fi
done < <(find "$deps" -maxdepth 1 -type f -perm -u+x -regex '.*-[0-9a-f]\{16\}' \
    -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2-)
echo "pruned $removed stale executables from $deps"
