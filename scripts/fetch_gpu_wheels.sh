#!/usr/bin/env bash
# Download the wheels of scripts/gpu_wheels.txt for the GPU box (CPython 3.12, manylinux x86-64) into
# .gpu-wheels/ (git-ignored), then check that they and the repository fit the 64 MiB a device call
# carries. Needs PyPI; run it on a machine that has it, before `bash scripts/gpu_smoke.sh` there.
#
#   bash scripts/fetch_gpu_wheels.sh [DEST]        (default .gpu-wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.gpu-wheels}"
PY="${PYTHON:-python3}"
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$DEST"
grep -v -E '^\s*(#|$)' scripts/gpu_wheels.txt > "$DEST/requirements.txt"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" -r "$DEST/requirements.txt"
# one version of each: a stale wheel from an older list would stop the install on the box
stale=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$stale" ] || { echo "more than one wheel of: $stale (remove the old ones from $DEST)"; exit 1; }
ls -l "$DEST"/*.whl | awk '{printf "%10.2f MB  %s\n", $5 / 1e6, $9}' | sort -rn
wheels=$(cat "$DEST"/*.whl | wc -c)
repo=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
total=$((wheels + repo))
printf 'wheels %.1f MiB + tracked files %.1f MiB = %.1f MiB of the 64 MiB a call carries\n' \
  "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$repo / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
(( total < LIMIT )) || { echo "too large to carry in one call"; exit 1; }
