"""Learner-level GPU smoke test: the `Learner` class directly (no Ray, no vLLM) on one device, ZeRO-1 and ZeRO-3.

A tied, Qwen2.5-0.5B-shaped Llama (hidden 896, 24 layers, 14/2 heads, vocabulary 151,936) is built locally from a
config (no hub), so the run needs only torch, transformers, DeepSpeed and this package. For each ZeRO stage, in
bf16 with gradient checkpointing and the dynamic constraint, it checks the learner's log-probs and the first
step's CE and loss against a plain HF forward of the same weights, and the same update's loss and gradient norm in 4x
as many micro-batches, then times a few steps: peak memory, tokens/s, MFU. Then the same with a LoRA adapter
(`--lora` rank, default 16; the adapter starts at B = 0, so the same checks hold) for its peak memory and tokens/s
against full fine-tuning. Each run is a process of its own. Prints one JSON object per run and a markdown table for
docs/cluster.md's GPU status.

    python scripts/gpu_smoke.py                      # on a CUDA machine (scripts/gpu_smoke.sh installs what is missing)
    python scripts/gpu_smoke.py --cpu --tiny         # the same code path on CPU with a tiny model (tests run this)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_refiner.config import load  # noqa: E402
from rlhf_refiner.records import Batch, Prompt, Refinement, Reward, Rollout, Sample  # noqa: E402

QWEN_05B_SHAPE = {  # Qwen2.5-0.5B's dimensions, as a Llama (RoPE, SwiGLU, GQA, tied embeddings)
    "vocab_size": 151_936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
TINY_SHAPE = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build_model(out_dir: Path, shape: dict, dtype: torch.dtype) -> str:
    """A randomly initialised, tied LlamaForCausalLM and the embedded char tokenizer (only its pad/eos ids are used:
    the batch's token ids are random), saved locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_refiner import pi0

    tokenizer = pi0.build_tokenizer(out_dir)
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaked next-token distributions: per-token CEs that differ (not all ~log V)
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(out_dir)
    return str(out_dir)


def make_batch(vocab: int, samples: int, prompt_len: int, max_response: int, seed: int = 0) -> Batch:
    """Random prompts and responses of uneven lengths; every other response refined (a few tokens changed, as a
    minimal correction would), the rest copies; advantages of both signs."""
    rng = random.Random(seed)
    rows = []
    for i in range(samples):
        prompt_ids = tuple(rng.randrange(3, vocab) for _ in range(prompt_len))
        length = rng.randint(max_response // 4, max_response)
        response = tuple(rng.randrange(3, vocab) for _ in range(length))
        refined = response
        if i % 2:
            edit = rng.randrange(length)
            refined = response[:edit] + tuple(rng.randrange(3, vocab) for _ in range(min(8, length - edit)))
        prompt = Prompt(i, f"q{i}", prompt_ids, None, 0)
        rollout = Rollout(f"1-{i}-0", prompt, "", response, tuple(-1.0 for _ in response), True, 0)
        refinement = Refinement(rollout.sample_id, "", refined, refined == response, 0, False, 0)
        reward = Reward(rollout.sample_id, 0.0, None)
        rows.append(Sample(rollout, refinement, reward, rng.uniform(-1.0, 1.0), 0))
    return Batch(tuple(rows), policy_version=0, dropped_stale=0)


def hf_reference(model_path: str, batch: Batch, dtype: torch.dtype, device: torch.device, pad_id: int):
    """Log-probs of the policy rows and the CE on the refined tokens from a plain HF forward (fp32 log-softmax)."""
    from transformers import AutoModelForCausalLM

    from rlhf_refiner.forward import build_rows

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    samples = list(batch.samples)
    logprobs, ce_sum, ce_tokens = [], 0.0, 0.0
    with torch.no_grad():
        for i in range(len(samples)):  # one row at a time: no padding at all in the reference
            rows = build_rows(samples[i : i + 1], pad_id, with_refined=True).to(device)
            logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, rows.input_ids[:, 1:, None])[..., 0]
            logprobs.append(lp[0][rows.target_mask[0].bool()].cpu())
            refined = lp[rows.refined_index]
            ce_sum -= (refined * rows.ce_mask).sum().item()
            ce_tokens += rows.ce_mask.sum().item()
    del model
    return logprobs, ce_sum / ce_tokens


def run_stage(
    model_path: str, stage: int, micro: int, steps: int, args: argparse.Namespace, batch: Batch, lora: int
) -> dict:
    from rlhf_refiner.forward import build_rows
    from rlhf_refiner.learner import Learner

    device_overrides = (
        ["learner.num_gpus=0", "model.dtype=float32"] if args.cpu else ["learner.num_gpus=1", "model.dtype=bfloat16"]
    )
    ds = f"{{zero_optimization: {{stage: {stage}}}{'' if args.cpu else ', bf16: {enabled: true}'}}}"
    config = load(
        None,
        [
            f"model.path={model_path}",
            *device_overrides,
            f"learner.deepspeed={ds}",
            "learner.gradient_checkpointing=true",
            f"learner.micro_batch_size={micro}",
            f"learner.peak_tflops={args.peak_tflops}",
            "learner.lr=1e-6",
            "algo.constraint=dynamic",
            "algo.log_kl_to_ref=false",
            f"data.prompts_per_step={len(batch.samples) // 8}",
            "generator.group_size=8",
            f"generator.sampling.max_new_tokens={args.max_response}",
            *([f"model.lora.rank={lora}", f"model.lora.alpha={2 * lora}"] if lora else []),
        ],
    )
    dtype = getattr(torch, config.model.dtype)
    learner = Learner(model_path, config)
    learner.setup()
    device = learner.engine.device
    samples = list(batch.samples)
    with torch.no_grad():  # the learner's batched, padded log-probs against the one-row HF reference
        rows = build_rows(samples, learner.pad_id, with_refined=False).to(device)
        ours, _ = learner.forward.logprobs(learner.engine, rows, one_pass=learner.forward.policy_one_pass)
    ours = [ours[i][rows.target_mask[i].bool()].float().cpu() for i in range(len(samples))]
    reference, reference_ce = hf_reference(model_path, batch, dtype, device, learner.pad_id)
    logprob_error = max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = learner.step(batch)
    timed = []
    for _ in range(steps):
        started = time.perf_counter()
        metrics = learner.step(batch)
        timed.append((time.perf_counter() - started, metrics))
    seconds, median = sorted(timed, key=lambda tm: tm[0])[len(timed) // 2] if timed else (float("nan"), first)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "zero_stage": stage,
        "lora_rank": lora,
        "policy_one_pass": learner.forward.policy_one_pass,  # ZeRO-3: one padded forward, or it holds the model
        "micro_batch_size": micro,
        "dtype": config.model.dtype,
        "params": learner.num_params,
        "samples": len(samples),
        "trained_tokens": sum(
            len(s.rollout.prompt.prompt_token_ids) + len(s.rollout.response_token_ids) for s in samples
        ),
        "logprob_max_abs_error": logprob_error,
        "ce_first_step": first["learner/ce_refined"],
        "ce_hf_reference": reference_ce,
        # ratio 1 on the first step: GRPO's term is −mean(A) (seq_mean_token_mean), plus λ = 1 times the CE
        "loss_hf_reference": -sum(s.advantage for s in samples) / len(samples) + reference_ce,
        "loss_first_step": first["learner/loss"],
        "grad_norm_first_step": first["learner/grad_norm"],
        "step_seconds_median": seconds,
        "tokens_per_s": median["learner/tokens_per_s"],
        "mfu": median.get("learner/mfu"),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| card | ZeRO | LoRA r | dtype | log-prob max error vs HF | CE step 1 / HF | step (s) | tokens/s | MFU | "
        "peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "–"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "–"
        lines.append(
            f"| {r['device']} | {r['zero_stage']} | {r['lora_rank'] or '–'} | {r['dtype']} | "
            f"{r['logprob_max_abs_error']:.3g} | "
            f"{r['ce_first_step']:.4f} / {r['ce_hf_reference']:.4f} | {r['step_seconds_median']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {mfu} | {peak} |"
        )
    return "\n".join(lines)


def child(args: argparse.Namespace, shape: dict) -> int:
    """One (stage, micro-batch size, LoRA rank) run in a process of its own, so that no run's memory outlives it."""
    stage, micro, steps, lora = args.child
    batch = make_batch(shape["vocab_size"], args.samples, args.prompt_len, args.max_response)
    result = run_stage(str(args.model), stage, micro, steps, args, batch, lora)
    args.out.write_text(json.dumps(result))
    return 0


def spawn(args: argparse.Namespace, model: Path, stage: int, micro: int, steps: int, out: Path, lora: int = 0) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in PASSED and v is not None]
    flags += ["--cpu"] * args.cpu + ["--tiny"] * args.tiny
    command = [sys.executable, __file__, *flags, "--model", str(model), "--out", str(out), "--child"]
    subprocess.run([*command, str(stage), str(micro), str(steps), str(lora)], check=True)
    return json.loads(out.read_text())


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


PASSED = ("samples", "prompt_len", "max_response", "peak_tflops")  # the child's batch and MFU need these


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (gloo, fp32): the self-check")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the 0.5B shape")
    parser.add_argument("--stages", default="1,3", help="ZeRO stages, comma-separated")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-response", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one card (H100/H200)")
    parser.add_argument("--lora", type=int, default=16, help="LoRA rank of the adapter runs (0: none)")
    parser.add_argument("--tolerance", type=float, default=None, help="log-prob error bound (default: by dtype)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)  # child runs: the parent's model
    parser.add_argument("--child", type=int, nargs=4, help=argparse.SUPPRESS)  # STAGE MICRO STEPS LORA
    args = parser.parse_args(argv)
    shape = TINY_SHAPE if args.tiny else QWEN_05B_SHAPE
    if args.child:
        return child(args, shape)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu for the CPU self-check)", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.cpu else torch.bfloat16
    tolerance = args.tolerance or (1e-4 if args.cpu else 2e-2)  # bf16: padding and kernels move values ~1e-2
    results, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(build_model(Path(tmp) / "model", shape, dtype))
        for stage in (int(s) for s in args.stages.split(",")):
            result = spawn(args, model, stage, args.micro_batch_size, args.steps, Path(tmp) / f"zero{stage}.json")
            # the same update in 4x as many micro-batches: the same loss and gradient (global normalisation)
            split = spawn(args, model, stage, max(1, args.micro_batch_size // 4), 0, Path(tmp) / f"split{stage}.json")
            result["grad_norm_split"] = split["grad_norm_first_step"]
            result["loss_split"] = split["loss_first_step"]
            runs = [result]
            if args.lora:  # the adapter on the same model: peak memory and tokens/s against full fine-tuning
                out = Path(tmp) / f"lora{stage}.json"
                adapter = spawn(args, model, stage, args.micro_batch_size, args.steps, out, args.lora)
                adapter["peak_memory_vs_full"] = ratio(adapter["peak_memory_gib"], result["peak_memory_gib"])
                adapter["tokens_per_s_vs_full"] = ratio(adapter["tokens_per_s"], result["tokens_per_s"])
                runs.append(adapter)
            for run in runs:
                print(json.dumps(run), flush=True)
                results.append(run)
                name = f"ZeRO-{stage}" + (f", LoRA r={run['lora_rank']}" if run["lora_rank"] else "")
                checks = {
                    "log-probs vs HF (max abs)": (run["logprob_max_abs_error"], 0.0),
                    "CE vs HF": (run["ce_first_step"], run["ce_hf_reference"]),
                    "loss vs HF": (run["loss_first_step"], run["loss_hf_reference"]),
                }
                if "loss_split" in run:
                    checks["loss, 4x micro-batches"] = (run["loss_split"], run["loss_first_step"])
                    checks["grad norm, 4x micro-batches"] = (run["grad_norm_split"], run["grad_norm_first_step"])
                for check, (ours, reference) in checks.items():
                    if abs(ours - reference) > tolerance * max(1.0, abs(reference)):
                        problems.append(f"{name}: {check}: {ours:.6g} vs {reference:.6g} (tolerance {tolerance})")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
