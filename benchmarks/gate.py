"""Figure `refine_gate`: the gated-copy refiner (`refiner.mode=gated`) against plain greedy refinement, swept over τ.

π0 generates batches as the policy (the generator engine, step 0); each refiner setting then refines the same
rollouts, timed from cold prefix caches against regenerating them (same prompts, seeds). Per setting: the
unchanged fraction, the mean token edit distance, `improved_frac` / `worsened_frac` (the reward of a' against
a's, scored by the run's own reward worker, over the changed a'), and refine time / regeneration time. The argmax
gate must reproduce plain greedy decoding (the `ray` tier asserts it); looser gates (τ) keep more of a.
"""

from __future__ import annotations

import gc
from pathlib import Path

from benchmarks.refine import _timed, policy_and_refiner, shapes
from benchmarks.runs import in_fresh_process

ENGINE, TORCH = {"mode": "gated", "gate_scorer": "engine"}, {"mode": "gated", "gate_scorer": "torch"}
SETTINGS = {  # name -> refiner overrides, each complete: the config's own mode and scorer must not leak in
    "decode": {"mode": "decode"},
    "gated argmax": ENGINE,
    "gated argmax, torch scorer": TORCH,
    "gated τ=0.5": {**ENGINE, "gate_tau": 0.5},
    "gated τ=0.2": {**ENGINE, "gate_tau": 0.2},
    "gated τ=0.1": {**ENGINE, "gate_tau": 0.1},
    "gated τ=0.1, torch scorer": {**TORCH, "gate_tau": 0.1},
    "gated τ=0.05": {**ENGINE, "gate_tau": 0.05},
}


def measure(config_file: str, quick: bool, batches: int, *overrides: str) -> dict:
    from rlhf_refiner.reward import RewardWorker

    config, source, generator, refiner, regenerate = policy_and_refiner(config_file, quick, *overrides)
    scorer = RewardWorker(config.reward, config.task)
    base = config.refiner

    refiner.refine(generator.generate(source.next_batch(0), 1)[0])  # warm both engines
    if refiner.scorer is None:  # the torch scorer's model load is not part of any timed refinement
        refiner._start_scorer()
    cold = (generator.llm, refiner.llm)
    stats = {name: {"seconds": 0.0, "unchanged": 0, "edits": 0, "changed": 0, "improved": 0, "worsened": 0}
             for name in SETTINGS}  # fmt: skip
    regen_seconds, samples = 0.0, 0
    for _ in range(batches):
        rollouts, _ = generator.generate(source.next_batch(0), 1)
        before = [r.reward for r in scorer.score(rollouts)]
        samples += len(rollouts)
        regen_seconds += _timed(regenerate, rollouts, engines=cold)[1]
        for name, setting in SETTINGS.items():
            refiner.config = base.model_copy(update=setting)
            (refined, _), seconds = _timed(refiner.refine, rollouts, engines=cold)
            s = stats[name]
            s["seconds"] += seconds
            s["unchanged"] += sum(f.unchanged for f in refined)
            s["edits"] += sum(f.edit_distance for f in refined)
            changed = [i for i, f in enumerate(refined) if not f.unchanged and not f.fallback]
            after = [
                r.reward for r in scorer.score_refined([rollouts[i] for i in changed], [refined[i] for i in changed])
            ]
            s["changed"] += len(changed)
            s["improved"] += sum(a > before[i] for i, a in zip(changed, after))
            s["worsened"] += sum(a < before[i] for i, a in zip(changed, after))
    del generator.llm, refiner.llm
    gc.collect()
    return {"model": Path(config.model.path).name, "stats": stats, "regen_seconds": regen_seconds, "samples": samples}


def figures(quick: bool) -> list[dict]:
    results = []
    for config_file, label, batches, overrides in shapes(quick, 4):
        m = in_fresh_process(measure, config_file, quick, batches, *overrides)
        n, regen = m["samples"], m["regen_seconds"]
        for name, s in m["stats"].items():
            changed = max(s["changed"], 1)
            results.append(
                {
                    "name": "refine_gate",
                    "value": round(s["seconds"] / regen, 3),
                    "goal": "report",
                    "measured": f"{name}: refine {s['seconds']:.2f}s / regenerate {regen:.2f}s; unchanged "
                    f"{s['unchanged'] / n:.3f}, edit distance {s['edits'] / n:.3f} tokens, improved "
                    f"{s['improved'] / changed:.3f}, worsened {s['worsened'] / changed:.3f} of {s['changed']} "
                    f"changed; {label}, {config_file}, {batches} batches, {n} samples",
                }
            )
    return results
