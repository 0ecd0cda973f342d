#!/usr/bin/env bash
# GPU smoke check for an NVIDIA box (H100/H200): SFT step time and peak memory with HF (TRL/PEFT) and with
# Unsloth, rollout throughput with HF generate and with vLLM, on a randomly initialised model of
# Qwen2.5-VL-3B's shape; then the GPU tests (pytest -m gpu --run-gpu). Under 8 minutes; nothing is
# downloaded (pip runs with --no-index).
#
# Needs on the box: Python 3.11 with torch 2.11+ (CUDA build), transformers, peft, accelerate, pillow,
# pydantic, pyyaml, pytest, numpy. Carried as wheels in a folder (default ./wheels, or $1, or
# $STEERKIT_WHEELS), made beforehand on a machine with PyPI access for the box's Python and platform:
#
#   pip download -d wheels --python-version 3.11 --only-binary=:all: \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       trl==1.16.0 datasets==5.2.0                                   # the main stack
#   pip download -d wheels ... unsloth==2026.10.9 unsloth_zoo==2026.10.9 "trl<=1.15.0" \
#       "transformers<=5.17.0" "datasets<5" torchvision               # Unsloth's pins (optional)
#   pip download -d wheels ... vllm==0.33.0                           # optional
#
# trl/datasets go into the current environment when missing. Unsloth (which pins older trl and
# transformers) and vLLM (which pins its own torch) each go into a virtual environment layered on this
# one (--system-site-packages) under $OUT, so the base environment is never changed. A missing wheel
# skips its part with a message. Results: $OUT/*.json and the printed table (default OUT=gpu_smoke_out).
#
#   bash scripts/gpu_smoke.sh [WHEELS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="$(realpath -m "${1:-${STEERKIT_WHEELS:-wheels}}")"
OUT="$(realpath -m "${STEERKIT_SMOKE_OUT:-gpu_smoke_out}")"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # steerkit from this checkout, without its pins
mkdir -p "$OUT"
rm -f "$OUT"/*.json
SMOKE="$PWD/scripts/gpu_smoke.py"
MODEL="$OUT/model"

BUDGET=470  # seconds for the whole script (under 8 minutes); each step gets at most what is left
run_for() {  # seconds, command... : run with a timeout that also respects the overall budget
  local t=$1 left=$((BUDGET - SECONDS))
  (( left < t )) && t=$left
  if (( t < 15 )); then echo "skipped: the 8-minute budget is spent"; return 1; fi
  timeout "$t" "${@:2}"
}
say() { printf '\n== %s (%ss elapsed)\n' "$*" "$SECONDS"; }
has_wheel() { compgen -G "$WHEELS/$1-*.whl" >/dev/null; }
wheels_into() {  # seconds, python, packages...
  run_for "$1" "$2" -m pip install --quiet --no-index --find-links "$WHEELS" "${@:3}"
}
layered_env() {  # name -> path of a python in a venv on top of this environment
  local venv="$OUT/venv-$1"
  [ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv"
  echo "$venv/bin/python"
}

say "GPU"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))' || exit 1

say "main stack: trl and datasets"
if ! "$PY" -c 'import trl, datasets' 2>/dev/null; then
  wheels_into 60 "$PY" trl datasets || { echo "trl/datasets missing and not installable from $WHEELS"; exit 1; }
fi

say "model: Qwen2.5-VL-3B shape, random weights"
[ -f "$MODEL/gpu_smoke.json" ] || run_for 100 "$PY" "$SMOKE" build --out "$MODEL" || exit 1

say "SFT step, HF (TRL + PEFT LoRA)"
run_for 80 "$PY" "$SMOKE" sft --model "$MODEL" --backend hf --json "$OUT/sft_hf.json" || echo "HF SFT failed or timed out"

say "SFT step, Unsloth"
if has_wheel unsloth; then
  UPY="$(layered_env unsloth)"
  if wheels_into 45 "$UPY" unsloth unsloth_zoo "trl<=1.15.0" "transformers<=5.17.0" "datasets<5"; then
    run_for 80 "$UPY" "$SMOKE" sft --model "$MODEL" --backend unsloth --json "$OUT/sft_unsloth.json" \
      || echo "Unsloth SFT failed or timed out"
  else
    echo "Unsloth: could not install from $WHEELS (its dependencies must be in the folder too); skipped"
  fi
else
  echo "Unsloth: no unsloth wheel in $WHEELS; skipped"
fi

say "rollouts, HF generate"
run_for 60 "$PY" "$SMOKE" generate --model "$MODEL" --engine hf --json "$OUT/generate_hf.json" || echo "HF generate failed or timed out"

say "rollouts, vLLM"
if has_wheel vllm; then
  VPY="$(layered_env vllm)"
  if wheels_into 45 "$VPY" vllm; then
    run_for 100 "$VPY" "$SMOKE" generate --model "$MODEL" --engine vllm --json "$OUT/generate_vllm.json" \
      || echo "vLLM generate failed or timed out"
  else
    echo "vLLM: could not install from $WHEELS (its dependencies must be in the folder too); skipped"
  fi
else
  echo "vLLM: no vllm wheel in $WHEELS; skipped"
fi

say "results"
"$PY" "$SMOKE" report "$OUT"

say "pytest -m gpu --run-gpu"
run_for 60 "$PY" -m pytest -q -m gpu --run-gpu -p no:cacheprovider tests
status=$?
say "done"
exit $status
