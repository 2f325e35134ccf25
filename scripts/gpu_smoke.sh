#!/usr/bin/env bash
# Learner-level GPU smoke test: scripts/gpu_smoke.py (the Learner on one CUDA device, ZeRO-1 and ZeRO-3, bf16,
# gradient checkpointing, a tied 0.5B-shaped Llama built locally; full fine-tuning and a LoRA adapter) in under 7
# minutes. A GPU machine may have CUDA
# torch and transformers but no DeepSpeed and no network, so the wheels it lacks are prepared here first:
#
#   bash scripts/gpu_smoke.sh --prepare   # with network: wheelhouse/ (DeepSpeed, peft and small deps, ~17 MB)
#   bash scripts/gpu_smoke.sh             # on the GPU machine: installs from wheelhouse/ what is missing, runs
#
# Results go to stdout and, as JSON, to $OUT/gpu_smoke.json (or ./gpu_smoke.json): copy the table into the
# docs/cluster.md's "GPU status" with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELHOUSE:-wheelhouse}
PYTHON=${PYTHON:-python}

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  # Pure-Python wheels, any interpreter: DeepSpeed (an sdist on PyPI, built here without its C++ ops) and the
  # small dependencies a torch + transformers machine may lack.
  # (--no-build-isolation: DeepSpeed's setup imports torch; an isolated build would fetch a CUDA torch.)
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-build-isolation -q -w "$WHEELS" deepspeed==0.19.8 hjson \
    py-cpuinfo einops peft==0.21.2 accelerate
  # Binary dependencies (with theirs: pydantic-core), for the CPython versions a GPU image is likely to have.
  for version in 3.10 3.11 3.12 3.13; do
    "$PYTHON" -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      pydantic==2.14.4 msgpack ninja psutil pyyaml
  done
  du -sh "$WHEELS"
  exit 0
fi

missing=()
for module in deepspeed pydantic yaml hjson cpuinfo msgpack einops ninja psutil peft accelerate; do
  "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$module")
done
if ((${#missing[@]})); then
  [[ -d "$WHEELS" ]] || { echo "error: missing ${missing[*]} and no $WHEELS/ (run --prepare where there is network)" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" deepspeed pydantic pyyaml hjson py-cpuinfo msgpack \
    einops ninja psutil peft accelerate
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
export DS_BUILD_OPS=0 DS_ACCELERATOR=cuda
timeout 420 "$PYTHON" scripts/gpu_smoke.py --out "${OUT:-.}/gpu_smoke.json" "$@"
