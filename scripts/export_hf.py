"""Export a training checkpoint as an HF model dir (weights + config + tokenizer) that vLLM, transformers and TRL
load by path. (`final/` is written this way at the end of every run; this is for the checkpoints in between.)

    python scripts/export_hf.py RUN_DIR/checkpoints/step-00000080 --out exported/ [--base MODEL_PATH]

The checkpoint is verified against its manifest first. Under ZeRO 1-3 the fp32 master weights are gathered from
the optimizer shards (DeepSpeed's zero_to_fp32); under ZeRO 0 the module state is used as saved. A LoRA run's
checkpoint holds the adapter alone: it is put on the base and merged, and written beside it in `adapter/`. `--base` (the
run's model path, for the architecture and tokenizer) defaults to the `model_path` in the run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def checkpoint_state_dict(learner_dir: Path) -> dict:
    import torch

    model_states = torch.load(
        learner_dir / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    stage = (model_states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        return dict(model_states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(learner_dir), tag="state"))


def with_adapter(model, lora: dict, adapter_state: dict, checkpoint_dir: Path, base: str):
    """`model` wrapped by peft with the run's adapter settings (`model.lora`), holding the checkpoint's adapter."""
    from rlhf_refiner import lora as lora_lib
    from rlhf_refiner.config import LoraConfig

    wrapped = lora_lib.with_lora(model, LoraConfig.model_validate(lora), base)
    expected = {name for name, _ in wrapped.named_parameters() if ".lora_" in name}
    buffers = {name for name, _ in wrapped.named_buffers()}  # a module state may hold persistent buffers too
    missing, unexpected = sorted(expected - adapter_state.keys()), sorted(adapter_state.keys() - expected - buffers)
    if missing or unexpected:
        raise SystemExit(
            f"{checkpoint_dir}: the adapter does not fit {base} with model.lora {lora} (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    wrapped.load_state_dict({k: v for k, v in adapter_state.items() if k in expected}, strict=False)
    return wrapped


def export(checkpoint_dir: Path, out: Path, base: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_refiner import checkpoint

    state = checkpoint.verify(checkpoint_dir)
    if base is None:
        summary = checkpoint_dir.parent.parent / "summary.json"
        if not summary.exists():
            raise SystemExit(f"{summary} not found: pass --base MODEL_PATH (the run's model.path)")
        base = json.loads(summary.read_text())["model_path"]
    model = AutoModelForCausalLM.from_pretrained(base)
    learner_state = checkpoint_state_dict(checkpoint_dir / "learner")
    lora = state.get("config", {}).get("model", {}).get("lora", {})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.get("rank"):  # the checkpoint holds the adapter alone: on the base, then merged, as final/ is
        adapter = with_adapter(model, lora, learner_state, checkpoint_dir, base)
        adapter.save_pretrained(tmp / "adapter")  # peft's format, as final/adapter/; before the merge unloads it
        model = adapter.merge_and_unload(safe_merge=True)
    else:
        missing, unexpected = model.load_state_dict(learner_state, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]:
            raise SystemExit(
                f"{checkpoint_dir}: checkpoint does not fit {base} (missing {missing}, unexpected {unexpected})"
            )
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    (tmp / "rlhf_refiner_checkpoint.json").write_text(json.dumps({"checkpoint": str(checkpoint_dir), **state}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-NNNNNNNN dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", default=None, help="model path the run started from (default: from summary.json)")
    args = parser.parse_args()
    from rlhf_refiner.checkpoint import CorruptCheckpointError

    try:
        out = export(args.checkpoint, args.out, args.base)
    except CorruptCheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
