"""Figures `refine_copy` and `refine_mixed`: what the refiner costs next to plain generation of the same responses.

π0 generates a batch as the policy (the generator engine, step 0); the refiner then refines it. `refine_copy` times
the refiner on the responses it leaves unchanged against regenerating exactly those responses (same prompts, same
seeds); `refine_mixed` does the same on the whole batch, at its natural unchanged fraction. Both engines live in
this process, measured in alternating rounds; the refiner is measured with copy-verify and with plain decoding.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from benchmarks.runs import load_config


def _timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def measure(config_file: str, quick: bool, batches: int, *overrides: str) -> dict:
    from transformers import AutoTokenizer

    from rlhf_refiner import engines
    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.generator import Generator, request_seed
    from rlhf_refiner.loop import resolve_model_path
    from rlhf_refiner.refiner import Refiner

    config = load_config(config_file, quick, "trainer.output_dir=/tmp/unused", *overrides)
    model_path = resolve_model_path(config)
    source = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(model_path))
    generator = Generator(model_path, config)
    refiner = Refiner(model_path, config.refiner, config.model.dtype, config.trainer.seed)
    sampling = config.generator.sampling

    def regenerate(rollouts):
        """Plain generation of exactly these responses: their prompts, their seeds."""
        params = []
        for r in rollouts:
            _, prompt_id, k = (int(x) for x in r.sample_id.split("-"))
            params.append(engines.sampling_params(sampling, request_seed(sampling.seed, 1, prompt_id, k), True))
        return engines.complete(generator.llm, [list(r.prompt.prompt_token_ids) for r in rollouts], params)

    generator.generate(source.next_batch(0), 1)  # warm both engines
    refiner.refine(generator.generate(source.next_batch(0), 1)[0])
    totals = {"gen_all": 0.0, "ref_all": 0.0, "gen_copy": 0.0, "ref_copy": 0.0, "decode_copy": 0.0, "decode_all": 0.0}
    counts = {"all": 0, "copy": 0, "verified": 0, "same": 0}
    for _ in range(batches):
        rollouts, _ = generator.generate(source.next_batch(0), 1)
        refiner.copy_verify = True
        (refined, metrics), seconds = _timed(refiner.refine, rollouts)
        totals["ref_all"] += seconds
        counts["verified"] += round(metrics["refiner/verified_copy_frac"] * len(rollouts))
        regenerated, seconds = _timed(regenerate, rollouts)
        counts["same"] += sum(c.token_ids == r.response_token_ids for c, r in zip(regenerated, rollouts))
        totals["gen_all"] += seconds
        copies = [r for r, f in zip(rollouts, refined) if f.unchanged and not f.fallback]
        counts["all"] += len(rollouts)
        counts["copy"] += len(copies)
        if copies:
            totals["ref_copy"] += _timed(refiner.refine, copies)[1]
            totals["gen_copy"] += _timed(regenerate, copies)[1]
            refiner.copy_verify = False
            totals["decode_copy"] += _timed(refiner.refine, copies)[1]
        refiner.copy_verify = False
        totals["decode_all"] += _timed(refiner.refine, rollouts)[1]
    del generator.llm, refiner.llm  # shut both engines down before the next measurement
    gc.collect()
    return {"model": Path(model_path).name, "totals": totals, "counts": counts}


def figures(quick: bool) -> list[dict]:
    shapes = [("configs/quickstart.yaml", "tiny π0 (embedded)", 1 if quick else 6, ())]
    smollm2 = Path("~/.cache/rlhf_refiner/smollm2-135m-instruct").expanduser()
    if not quick and smollm2.exists():
        shapes.append(("configs/smollm2.yaml", "SmolLM2-135M-Instruct", 3, ("data.prompts_per_step=16",)))
    results = []
    for config_file, label, batches, overrides in shapes:
        m = measure(config_file, quick, batches, *overrides)
        t, n = m["totals"], m["counts"]
        shape = f"{label}, {config_file}, {batches} batches of {n['all'] // batches}"
        copy_ratio = t["ref_copy"] / t["gen_copy"] if n["copy"] else None
        results.append(
            {
                "name": "refine_copy",
                "value": None if copy_ratio is None else round(copy_ratio, 3),
                "goal": "<= 0.30",
                "measured": f"refiner {t['ref_copy']:.2f}s on the {n['copy']} unchanged responses / regenerating "
                f"them {t['gen_copy']:.2f}s; plain-decoding refiner "
                + (f"{t['decode_copy'] / t['gen_copy']:.3f}" if n["copy"] else "n/a")
                + f"; {shape}",
            }
        )
        results.append(
            {
                "name": "refine_mixed",
                "value": round(t["ref_all"] / t["gen_all"], 3),
                "goal": "report",
                "measured": f"refiner {t['ref_all']:.2f}s / generation {t['gen_all']:.2f}s on all {n['all']}; "
                f"unchanged {n['copy'] / n['all']:.2f}, verified copies {n['verified'] / n['all']:.2f}; "
                f"plain-decoding refiner {t['decode_all'] / t['gen_all']:.3f}; regeneration reproduced "
                f"{n['same']}/{n['all']} responses exactly; {shape}",
            }
        )
    return results
