"""Held-out evaluation of a saved model: python scripts/evaluate.py RUN_OR_MODEL_DIR [--config CFG] [key=value ...]

RUN_OR_MODEL_DIR is a run's output dir (its `final/` is evaluated, with the run's own `config.yaml`) or any HF
model dir (the embedded π0's cache dir, an `export_hf.py` export; its task comes from `--config`, else the
defaults: the embedded arithmetic task). The prompts are the run's held-out set (`eval.*`: the embedded task's
held-out problems, or a real dataset's `eval.split`), rendered with the model's chat template exactly as
training renders them, answered with `eval.temperature` (greedy by default) by transformers' `generate` on this
machine (no Ray, no vLLM), and scored by the run's own reward sources. Prints the `eval/*` metrics as JSON and
writes them to `--out` (a run dir: `RUN/eval.json`).

Why the chat template matters: the embedded π0 learned `<|user|>047+085=<|end|><|assistant|>` (zero-padded
operands, one chat turn) and answers with the sum's digits reversed, `231`; a bare `tokenizer("47+85=")` is a
prompt it never saw, and it babbles (`774444`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def resolve(target: Path, config_path: str | None) -> tuple[Path, str | None]:
    """(model dir, config file): a run dir gives its `final/` and its `config.yaml`."""
    if (target / "config.yaml").is_file() and (target / "final" / "config.json").is_file():
        return target / "final", config_path or str(target / "config.yaml")
    if (target / "config.json").is_file():
        return target, config_path
    raise SystemExit(f"error: {target} is neither a run dir with final/ nor an HF model dir (no config.json)")


def generate(model, tokenizer, prompts, sampling, n: int, batch_size: int, stop_ids: tuple[int, ...]):
    """(prompt index, response token ids, finished) for n responses per prompt, in left-padded batches, decoded as
    the generator's vLLM engine decodes: only these sampling settings (none of the model's generation_config.json
    defaults, such as a repetition penalty), stopping on any of `stop_ids` or a stop string."""
    import torch
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    greedy = sampling.temperature == 0
    # generate() fills every field our settings leave at its default from the model's own generation_config.json
    # (which final/ inherits from π0: Qwen2.5-Instruct ships a repetition penalty, top_k 20, top_p 0.8, do_sample),
    # so a penalty of 1.0 or do_sample=False cannot be asked for explicitly: the model's defaults go instead.
    model.generation_config = GenerationConfig()
    settings = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=0,  # None would be transformers' default of 50; vLLM samples from the whole vocabulary
        repetition_penalty=1.0,
        pad_token_id=pad,
        eos_token_id=list(stop_ids),
        stop_strings=list(sampling.stop) or None,
    )
    requests = [(i, list(p.prompt_token_ids)) for i, p in enumerate(prompts) for _ in range(n)]
    torch.manual_seed(sampling.seed)
    out = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in chunk], device=model.device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=settings, tokenizer=tokenizer
            )
        for (index, _), row in zip(chunk, generated[:, width:].tolist()):
            ends = [k for k, token in enumerate(row) if token in stop_ids]
            ids = row[: ends[0] + 1] if ends else [t for t in row if t != pad]  # with its end token, as vLLM's
            out.append((index, ids, bool(ends)))
    return out


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string (vLLM drops it from the output), and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def score(config, rollouts):
    """The run's reward sources on the held-out rollouts, in-process (the actors' plain classes)."""
    from rlhf_refiner.reward import WORKER_SOURCES, RewardWorker, merge
    from rlhf_refiner.reward.model import RewardModel

    parts = []
    if any(source in WORKER_SOURCES for source in config.reward.weights):
        parts.append(RewardWorker(config.reward, config.task).score(rollouts))
    if "model" in config.reward.weights:
        model = RewardModel(config.reward.model, config.reward.weights["model"], config.trainer.seed)
        parts.append(model.score(rollouts))
    return merge(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="a run's output dir, or an HF model dir")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml, else defaults)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the metrics (run dir: RUN/eval.json)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.num_prompts=50")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    import yaml

    from rlhf_refiner import config as config_lib

    model_dir, config_path = resolve(args.target, args.config)
    overrides = list(args.overrides)
    saved_function = args.target / "reward_function.py"  # the text the run's workers ran, not today's file
    if model_dir != args.target and saved_function.is_file():
        spec = (yaml.safe_load(Path(config_path).read_text()).get("reward") or {}).get("function") or ""
        name = spec.rpartition(":")[2]
        overrides.insert(0, f"reward.function={saved_function}:{name}")
    try:
        config = config_lib.load(config_path, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model_dir != args.target and config.data.source == "arithmetic" and not config.trainer.eval_every:
        print(
            f"warning: {args.target} trained with trainer.eval_every=0, so its training prompts were not kept apart "
            "from these problems; the score is not a held-out one",
            file=sys.stderr,
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.evaluation import sampling, summarize
    from rlhf_refiner.records import Rollout
    from rlhf_refiner.refiner import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        prompts = PromptSource(config.data, config.task, tokenizer, config.eval).held_out
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    params = sampling(config)
    stop_ids = stop_token_ids(str(model_dir), tokenizer)
    outputs = generate(model, tokenizer, prompts, params, config.eval.samples_per_prompt, args.batch_size, stop_ids)
    rollouts, seen = [], {}
    for index, ids, finished in outputs:
        k = seen[index] = seen.get(index, -1) + 1
        prompt = prompts[index]
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text, stopped = cut_at_stop(text, list(params.stop))
        rollouts.append(Rollout(f"eval-{prompt.prompt_id}-{k}", prompt, text, tuple(ids), (), finished or stopped, 0))
    metrics = {"model": str(model_dir), **summarize(rollouts, score(config, rollouts))}
    out = args.out or (args.target / "eval.json" if model_dir != args.target else None)
    text = json.dumps(metrics, indent=2)
    print(text)
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
