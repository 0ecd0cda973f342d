#!/usr/bin/env bash
# The GPU figures in one run on an NVIDIA box (one H200: about 8 minutes). Installs the carried wheels
# (scripts/gpu_wheels.txt, fetched beforehand by scripts/fetch_gpu_wheels.sh into .gpu-wheels/) with
# --no-deps into a folder on PYTHONPATH, so the box's own torch / transformers 5.17 stay as they are and
# nothing is downloaded; then runs scripts/gpu_smoke.py (every phase, one result line each as it ends).
# docs/gpu.md says what each phase measures and the goals.
#
#   bash scripts/gpu_smoke.sh [WHEELS_DIR] [-- extra gpu_smoke.py run arguments]
#
# Environment: OUT (results folder; default gpu_smoke_out), WORK (the 7.5 GB model and the phases'
# files; default /tmp/steerkit-gpu-work, reused by a rerun), BUDGET_S (seconds for the model build and
# the phases; default 500), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.gpu-wheels}"
shift $(( $# > 0 ? 1 : 0 ))
[ "${1:-}" = "--" ] && shift
OUT="${OUT:-gpu_smoke_out}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/steerkit-gpu-site}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_DISABLE_TELEMETRY=1

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"' || exit 1
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  t=$SECONDS
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "could not install the wheels of $WHEELS"; exit 1; }
  echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $((SECONDS - t)) s"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: using what is installed (trl and datasets must be there)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# what imports, before the phases that need it (the sft_unsloth phase reports its own import error)
err="$(mktemp)"
for mod in trl datasets pydantic; do
  "$PY" -c "import $mod" >/dev/null 2>"$err" && echo "import $mod: ok" \
    || echo "import $mod: FAILED: $(grep -E 'Error|error' "$err" | tail -1)"
done
rm -f "$err"
exec "$PY" scripts/gpu_smoke.py run --out "$OUT" --work "${WORK:-/tmp/steerkit-gpu-work}" --budget-s "${BUDGET_S:-500}" "$@"
