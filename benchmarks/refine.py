"""Figures `refine_copy` and `refine_mixed`: what the refiner costs next to plain generation of the same responses.

π0 generates a batch as the policy (the generator engine, step 0); the refiner then refines it. `refine_copy` times
the refiner on the responses it leaves unchanged against regenerating exactly those responses (same prompts, same
seeds); `refine_mixed` does the same on the whole batch, at its natural unchanged fraction. Both engines live in
this process, measured in alternating rounds; the refiner as configured (with dedupe) is the figure
(the quickstart's: the torch-scored argmax gate), and plain decoding, copy-verify, no-dedupe and
gated-copy (argmax gate, torch scorer: the same a') variants are reported next to it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from benchmarks.runs import in_fresh_process, load_config


def _timed(fn, *args, engines=()):
    """Seconds of fn(*args), from cold prefix caches: a step's prompts are new to both engines."""
    for llm in engines:
        llm.reset_prefix_cache()
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def policy_and_refiner(config_file: str, quick: bool, *overrides: str):
    """(config, prompt source, generator, refiner, regenerate) in this process for the refiner figures; regenerate
    makes exactly the given rollouts again with the generator (their prompts, their seeds)."""
    from transformers import AutoTokenizer

    from rlhf_refiner import engines
    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.generator import Generator, request_seed, returns_logprobs
    from rlhf_refiner.loop import resolve_model_path
    from rlhf_refiner.refiner import Refiner

    config = load_config(config_file, quick, "trainer.output_dir=/tmp/unused", *overrides)
    model_path = resolve_model_path(config)
    source = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(model_path))
    generator = Generator(model_path, config)
    refiner = Refiner(model_path, config.refiner, config.model.dtype, config.trainer.seed)
    sampling = config.generator.sampling
    logprobs = returns_logprobs(config)  # as the Generator asks

    def regenerate(rollouts):
        params = []
        for r in rollouts:
            _, prompt_id, k = (int(x) for x in r.sample_id.split("-"))
            params.append(engines.sampling_params(sampling, request_seed(sampling.seed, 1, prompt_id, k), logprobs))
        return engines.complete(generator.llm, [list(r.prompt.prompt_token_ids) for r in rollouts], params)

    return config, source, generator, refiner, regenerate


def measure(config_file: str, quick: bool, batches: int, *overrides: str) -> dict:
    config, source, generator, refiner, regenerate = policy_and_refiner(config_file, quick, *overrides)
    model_path = config.model.path
    generator.generate(source.next_batch(0), 1)  # warm both engines
    refiner.refine(generator.generate(source.next_batch(0), 1)[0])
    if refiner.scorer is None:  # the torch scorer's model load is not part of any timed refinement
        refiner._start_scorer()
    variants = {  # name -> (dedupe, copy_verify, refiner config changes); "default": as the config says
        "default": (True, False, {}),
        "decode": (True, False, {"mode": "decode"}),
        "copy_verify": (True, True, {"mode": "decode"}),
        "no_dedupe": (False, False, {}),
        "gated_torch": (True, False, {"mode": "gated", "gate_scorer": "torch"}),  # argmax gate: the same a'
    }
    base = refiner.config

    def use(variant: str) -> None:
        dedupe, copy_verify, changes = variants[variant]
        refiner.dedupe, refiner.copy_verify = dedupe, copy_verify
        refiner.config = base.model_copy(update=changes)

    cold = (generator.llm, refiner.llm)
    totals = {f"{v}_{part}": 0.0 for v in variants for part in ("all", "copy")} | {"gen_all": 0.0, "gen_copy": 0.0}
    counts = {"all": 0, "copy": 0, "verified": 0, "same": 0, "distinct": 0, "gate_as_decode": 0}
    for _ in range(batches):
        rollouts, _ = generator.generate(source.next_batch(0), 1)
        refined = None
        outputs = {}
        for variant in variants:
            use(variant)
            (result, metrics), seconds = _timed(refiner.refine, rollouts, engines=cold)
            outputs[variant] = [(f.refined, f.fallback) for f in result]
            totals[f"{variant}_all"] += seconds
            if variant == "default":
                refined = result
                counts["distinct"] += round(metrics["refiner/distinct_frac"] * len(rollouts))
            if variant == "copy_verify":
                counts["verified"] += round(metrics["refiner/verified_copy_frac"] * len(rollouts))
        # the argmax gate is greedy decoding exactly where the torch scorer's argmax is the engine's
        counts["gate_as_decode"] += sum(g == d for g, d in zip(outputs["gated_torch"], outputs["decode"]))
        regenerated, seconds = _timed(regenerate, rollouts, engines=cold)
        counts["same"] += sum(c.token_ids == r.response_token_ids for c, r in zip(regenerated, rollouts))
        totals["gen_all"] += seconds
        copies = [r for r, f in zip(rollouts, refined) if f.unchanged and not f.fallback]
        counts["all"] += len(rollouts)
        counts["copy"] += len(copies)
        if copies:
            totals["gen_copy"] += _timed(regenerate, copies, engines=cold)[1]
            for variant in variants:
                use(variant)
                totals[f"{variant}_copy"] += _timed(refiner.refine, copies, engines=cold)[1]
    del generator.llm, refiner.llm  # shut both engines down before the next measurement
    gc.collect()
    mode = f"{base.mode}, {base.gate_scorer} scorer" if base.mode == "gated" else base.mode
    return {"model": Path(model_path).name, "totals": totals, "counts": counts, "mode": mode}


def _variants(totals: dict[str, float], part: str, base: float) -> str:
    return (f"plain greedy decoding {totals[f'decode_{part}'] / base:.3f}, copy-verify "
            f"{totals[f'copy_verify_{part}'] / base:.3f}, as configured without dedupe "
            f"{totals[f'no_dedupe_{part}'] / base:.3f}, gated argmax with the torch scorer "
            f"{totals[f'gated_torch_{part}'] / base:.3f}")  # fmt: skip


def shapes(quick: bool, batches: int) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(config, label, batches, overrides) of the refiner figures: the quickstart's π0, and SmolLM2 when prepared."""
    out = [("configs/quickstart.yaml", "tiny π0 (embedded)", 1 if quick else batches, ())]
    smollm2 = Path("~/.cache/rlhf_refiner/smollm2-135m-instruct").expanduser()
    if not quick and smollm2.exists():
        out.append(("configs/smollm2.yaml", "SmolLM2-135M-Instruct", 1, ("data.prompts_per_step=16",)))
    return out


def figures(quick: bool) -> list[dict]:
    results = []
    for config_file, label, batches, overrides in shapes(quick, 6):
        m = in_fresh_process(measure, config_file, quick, batches, *overrides)
        t, n = m["totals"], m["counts"]
        shape = f"{label}, {config_file}, {batches} batches of {n['all'] // batches}"

        results.append(
            {
                "name": "refine_copy",
                "value": round(t["default_copy"] / t["gen_copy"], 3) if n["copy"] else None,
                "goal": "<= 0.30",
                "measured": f"refiner as configured ({m['mode']}) {t['default_copy']:.2f}s on the {n['copy']} "
                f"unchanged responses / regenerating them {t['gen_copy']:.2f}s; "
                + (_variants(t, "copy", t["gen_copy"]) if n["copy"] else "")
                + f"; {shape}",
            }
        )
        results.append(
            {
                "name": "refine_mixed",
                "value": round(t["default_all"] / t["gen_all"], 3),
                "goal": "report",
                "measured": f"refiner as configured ({m['mode']}) {t['default_all']:.2f}s / generation "
                f"{t['gen_all']:.2f}s on all {n['all']}; "
                f"unchanged {n['copy'] / n['all']:.2f}, distinct (query, a) {n['distinct'] / n['all']:.2f}, "
                f"verified copies {n['verified'] / n['all']:.2f}; {_variants(t, 'all', t['gen_all'])}; the gate's a' "
                f"equal to decoding's on {n['gate_as_decode']}/{n['all']}; regeneration "
                f"reproduced {n['same']}/{n['all']} responses exactly; {shape}",
            }
        )
    return results
