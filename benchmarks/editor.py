"""Figure `refine_editor`: π0 as an editor of its own samples, before any RL (issue 26's first measurement).

π0 samples a few hundred responses at the generator's temperature (the generator engine at step 0: the policy is
π0), the run's reward worker scores them, and each refiner setting (template × mode) refines the same responses.
Per setting, over the samples:
- `copy`: a' == a, of the correct a (copy-when-correct: a conservative editor keeps a right answer);
- `broken`: a' is wrong, of the correct a (the refiner's `worsened`, on the true score);
- `fixed`: a' is correct, of the wrong a;
- `repaired`: a' is free of the task's degenerate pattern (`task/degenerate_rate`), of the a that carry it;
- `ended`: a' ends its turn, of the a cut at `max_new_tokens`;
- `edits`: mean token edit distance over all samples, and over the changed ones;
- `fallback`: π0's output was unusable (a' = a, no CE).
Settings are complete refiner overrides on top of the config's (its template unless one is given).
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path

from benchmarks.runs import in_fresh_process

# SmolLM2's refiner templates: the config's own, and one that also shows π0 the ground truth (`{reference}`)
REFERENCE = (
    "Question: {query}\nProposed answer: {response}\nThe correct final answer is {reference}.\n\n"
    "If the proposed answer ends with the correct final answer, repeat it exactly, word for word. If it does not, "
    "rewrite it with as few changes as possible so that it ends with the correct final answer. Reply with the "
    "answer only."
)
GATED = {"mode": "gated", "gate_scorer": "engine"}
SETTINGS = {  # name -> refiner overrides
    "decode": {"mode": "decode"},
    "gated argmax": GATED,
    "gated τ=0.1": {**GATED, "gate_tau": 0.1},
    "reference, decode": {"mode": "decode", "template": REFERENCE},
    "reference, gated argmax": {**GATED, "template": REFERENCE},
    "reference, gated τ=0.1": {**GATED, "gate_tau": 0.1, "template": REFERENCE},
}
QUICK_SETTINGS = ("decode", "gated argmax")  # the embedded π0's template has no reference: its own only


def editor_stats(correct: list[bool], degenerate: list[bool], truncated: list[bool], refined: list[dict]) -> dict:
    """The editor's rates over samples: `correct`, `degenerate` and `truncated` describe each a; `refined` each a'
    as {"unchanged", "correct", "degenerate", "ended", "edit_distance", "fallback"}."""
    n = len(refined)

    def share(pick, of) -> float | None:
        chosen = [r for r, keep in zip(refined, of) if keep]
        return sum(pick(r) for r in chosen) / len(chosen) if chosen else None

    changed = [r["edit_distance"] for r in refined if not r["unchanged"] and not r["fallback"]]
    return {
        "samples": n,
        "a_correct": sum(correct) / n,
        "a_degenerate": sum(degenerate) / n,
        "a_truncated": sum(truncated) / n,
        "copy": share(lambda r: r["unchanged"], correct),
        "broken": share(lambda r: not r["correct"], correct),
        "fixed": share(lambda r: r["correct"], [not c for c in correct]),
        "repaired": share(lambda r: not r["degenerate"], degenerate),
        "ended": share(lambda r: r["ended"], truncated),
        "edits": sum(r["edit_distance"] for r in refined) / n,
        "edits_changed": statistics.fmean(changed) if changed else 0.0,
        "fallback": sum(r["fallback"] for r in refined) / n,
    }


def measure(config_file: str, quick: bool, batches: int, names: tuple[str, ...], *overrides: str) -> dict:
    from benchmarks.refine import policy_and_refiner
    from rlhf_refiner.reward import RewardWorker

    config, source, generator, refiner, _ = policy_and_refiner(config_file, quick, *overrides)
    scorer = RewardWorker(config.reward, config.task)
    base = config.refiner
    rollouts = []
    for _ in range(batches):
        rollouts += generator.generate(source.next_batch(0), 1)[0]
    before = scorer.score(rollouts)
    correct, degenerate = [r.accuracy == 1.0 for r in before], [_degenerate(r) for r in before]
    truncated = [not r.finished for r in rollouts]
    stats, examples = {}, {}
    for name in names:
        refiner.config = base.model_copy(update=SETTINGS[name])
        refinements = []
        for i in range(0, len(rollouts), 64):  # the engine's batch, as a step would send it
            refinements += refiner.refine(rollouts[i : i + 64])[0]
        after = scorer.score_refined(rollouts, refinements)
        refined = [
            {
                "unchanged": f.unchanged,
                "correct": r.accuracy == 1.0,
                "degenerate": _degenerate(r),
                "ended": bool(f.refined_token_ids) and f.refined_token_ids[-1] in refiner.stop_ids,
                "edit_distance": f.edit_distance,
                "fallback": f.fallback,
            }
            for f, r in zip(refinements, after)
        ]
        stats[name] = editor_stats(correct, degenerate, truncated, refined)
        examples[name] = [  # the first few edits, to read what a' looks like
            {"query": r.prompt.query, "a": r.response, "a_refined": f.refined, "a_correct": c, "refined_correct": x}
            for r, f, c, x in zip(rollouts, refinements, correct, (d["correct"] for d in refined))
            if not f.unchanged
        ][:4]
    del generator.llm, refiner.llm
    gc.collect()
    return {"model": Path(config.model.path).name, "stats": stats, "examples": examples, "a": editor_stats(
        correct, degenerate, truncated, [{"unchanged": True, "correct": c, "degenerate": d, "ended": False,
        "edit_distance": 0, "fallback": False} for c, d in zip(correct, degenerate)])}  # fmt: skip


def _degenerate(reward) -> bool:
    return reward.components.get("task/degenerate_rate", 0.0) == 1.0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def figures(quick: bool) -> list[dict]:
    smollm2 = Path("~/.cache/rlhf_refiner/smollm2-135m-instruct").expanduser()
    shapes = [("configs/quickstart.yaml", "tiny π0 (embedded)", 1 if quick else 8, QUICK_SETTINGS, ())]
    if not quick and smollm2.exists():
        shapes.append(("configs/smollm2.yaml", "SmolLM2-135M-Instruct", 8, tuple(SETTINGS), ()))
    results = []
    for config_file, label, batches, names, overrides in shapes:
        m = in_fresh_process(measure, config_file, quick, batches, names, *overrides)
        for name, s in m["stats"].items():
            results.append(
                {
                    "name": "refine_editor",
                    "value": None if s["copy"] is None else round(s["copy"], 3),
                    "goal": "report",
                    "measured": f"{name}: copy-when-correct {_percent(s['copy'])}, broken {_percent(s['broken'])},"
                    f" fixed {_percent(s['fixed'])} of wrong, repaired {_percent(s['repaired'])} of degenerate, "
                    f"truncated a ended {_percent(s['ended'])}, edit "
                    f"distance {s['edits']:.1f} tokens ({s['edits_changed']:.1f} where changed), fallback "
                    f"{_percent(s['fallback'])}; a correct {_percent(s['a_correct'])}, degenerate "
                    f"{_percent(s['a_degenerate'])}, truncated "
                    f"{_percent(s['a_truncated'])}; {label}, {config_file}, {s['samples']} samples",
                    "examples": m["examples"][name],
                }
            )
    return results
