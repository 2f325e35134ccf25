"""Figure `refine_editor`: π0 as an editor of its own samples, before any RL (issue 26's first measurement).

π0 samples a few hundred responses at the generator's temperature (the generator engine at step 0: the policy is
π0), the run's reward worker scores them, and each refiner setting (template × mode) refines the same responses.
Per setting, over the samples:
- `copy`: a' == a, of the correct a (copy-when-correct: a conservative editor keeps a right answer);
- `broken`: a' is wrong, of the correct a (the refiner's `worsened`, on the true score);
- `fixed`: a' is correct, of the wrong a;
- `repaired`: a' is free of the task's degenerate pattern (`task/degenerate_rate`), of the a that carry it;
- `edits`: mean token edit distance over all samples, and over the changed ones;
- `fallback`: π0's output was unusable (a' = a, no CE).
Settings are complete refiner overrides on top of the config's (its template unless one is given); the
`reference` ones show π0 the ground truth (`{reference}`, data.source=arithmetic), in words fit for
`task.style=natural`. Samples without a true score (no ground truth, a reward's infrastructure error) are left out.
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
    "reference decode": {"mode": "decode", "template": REFERENCE},
    "reference gated argmax": {**GATED, "template": REFERENCE},
    "reference gated τ=0.1": {**GATED, "gate_tau": 0.1, "template": REFERENCE},
}
QUICK_SETTINGS = ("decode", "gated argmax")  # the embedded π0's template has no reference: its own only


def editor_stats(correct: list[bool], degenerate: list[bool], refined: list[dict]) -> dict:
    """The editor's rates over samples: `correct` and `degenerate` describe each a; `refined` each a' as
    {"unchanged", "correct", "degenerate", "edit_distance", "fallback"}."""
    n = len(refined)

    def share(pick, of) -> float | None:
        chosen = [r for r, keep in zip(refined, of) if keep]
        return sum(pick(r) for r in chosen) / len(chosen) if chosen else None

    changed = [r["edit_distance"] for r in refined if not r["unchanged"] and not r["fallback"]]
    return {
        "samples": n,
        "copy": share(lambda r: r["unchanged"], correct),
        "broken": share(lambda r: not r["correct"], correct),
        "fixed": share(lambda r: r["correct"], [not c for c in correct]),
        "repaired": share(lambda r: not r["degenerate"], degenerate),
        "edits": sum(r["edit_distance"] for r in refined) / n,
        "edits_changed": statistics.fmean(changed) if changed else 0.0,
        "fallback": sum(r["fallback"] for r in refined) / n,
    }


def measure(config_file: str, quick: bool, batches: int, names: tuple[str, ...], *overrides: str) -> dict:
    from benchmarks.refine import policy_and_refiner
    from rlhf_refiner.reward import RewardWorker

    config, source, generator, refiner, _ = policy_and_refiner(config_file, quick, *overrides)
    uses_reference = [n for n in names if "{reference}" in SETTINGS[n].get("template", "")]
    if uses_reference and config.data.source != "arithmetic":
        raise ValueError(f"{uses_reference} show π0 the reference answer, which data.source={config.data.source} lacks")
    scorer = RewardWorker(config.reward, config.task)
    base = config.refiner
    rollouts = []
    for _ in range(batches):
        rollouts += generator.generate(source.next_batch(0), 1)[0]
    before = scorer.score(rollouts)
    scored = [i for i, r in enumerate(before) if _scored(r)]  # an unscored a says nothing of its edit
    unscored = len(rollouts) - len(scored)
    rollouts, before = [rollouts[i] for i in scored], [before[i] for i in scored]
    correct, degenerate = [_correct(r) for r in before], [_degenerate(r) for r in before]
    n = len(rollouts)
    a = {
        "samples": n,
        "unscored": unscored,
        "a_correct": sum(correct) / n,
        "a_degenerate": sum(degenerate) / n,
        "a_truncated": sum(not r.finished for r in rollouts) / n,
    }
    stats, examples = {}, {}
    for name in names:
        refiner.config = base.model_copy(update=SETTINGS[name])
        refinements = []
        for i in range(0, n, 64):  # the engine's batch, as a step would send it
            refinements += refiner.refine(rollouts[i : i + 64])[0]
        after = scorer.score_refined(rollouts, refinements)
        keep = [i for i, r in enumerate(after) if _scored(r)]
        refined = [
            {
                "unchanged": refinements[i].unchanged,
                "correct": _correct(after[i]),
                "degenerate": _degenerate(after[i]),
                "edit_distance": refinements[i].edit_distance,
                "fallback": refinements[i].fallback,
            }
            for i in keep
        ]
        stats[name] = editor_stats([correct[i] for i in keep], [degenerate[i] for i in keep], refined)
        examples[name] = [  # the first few edits, to read what a' looks like
            {"query": r.prompt.query, "a": r.response, "a_refined": f.refined, "a_correct": c, "refined_correct": x}
            for r, f, c, x in zip(rollouts, refinements, correct, (_correct(r) for r in after))
            if not f.unchanged
        ][:4]
    del generator.llm, refiner.llm
    gc.collect()
    samples = [{"query": r.prompt.query, "a": r.response, "correct": c} for r, c in zip(rollouts[:12], correct)]
    return {"model": Path(config.model.path).name, "a": a, "stats": stats, "examples": examples, "samples": samples}


def _scored(reward) -> bool:
    return reward.accuracy is not None and not reward.infra_error


def _correct(reward) -> bool:
    return reward.accuracy == 1.0


def _degenerate(reward) -> bool:
    return reward.components.get("task/degenerate_rate", 0.0) == 1.0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def figures(quick: bool) -> list[dict]:
    smollm2 = Path("~/.cache/rlhf_refiner/smollm2-135m-instruct").expanduser()
    shapes = [("configs/quickstart.yaml", "tiny π0 (embedded)", 1 if quick else 8, QUICK_SETTINGS, ())]
    if not quick and smollm2.exists():
        fair = ("task.digits=1", "generator.sampling.temperature=0.7")  # π0 solves ~35 % (docs/results.md)
        shapes.append(("configs/smollm2.yaml", "SmolLM2-135M-Instruct", 8, tuple(SETTINGS), fair))
    results = []
    for config_file, label, batches, names, overrides in shapes:
        m = in_fresh_process(measure, config_file, quick, batches, names, *overrides)
        a = m["a"]
        for name, s in m["stats"].items():
            results.append(
                {
                    "name": "refine_editor",
                    "value": None if s["copy"] is None else round(s["copy"], 3),
                    "goal": "report",
                    "measured": f"{name}: copy-when-correct {_percent(s['copy'])}, broken {_percent(s['broken'])},"
                    f" fixed {_percent(s['fixed'])} of wrong, repaired {_percent(s['repaired'])} of degenerate, edit"
                    f" distance {s['edits']:.1f} tokens ({s['edits_changed']:.1f} where changed), fallback "
                    f"{_percent(s['fallback'])}; a correct {_percent(a['a_correct'])}, degenerate "
                    f"{_percent(a['a_degenerate'])}, truncated {_percent(a['a_truncated'])}; {label}, {config_file} "
                    f"{' '.join(overrides)}, {s['samples']} samples",
                    "examples": m["examples"][name],
                }
            )
    return results


def main() -> None:
    """One measurement on any config, printed as JSON: `python -m benchmarks.editor CONFIG [--batches N]
    [--settings decode,...] [key=value ...]` (no settings: π0's own samples only, before any edit)."""
    import argparse
    import json
    import os
    import sys

    parser = argparse.ArgumentParser(prog="python -m benchmarks.editor", description=main.__doc__.split(":")[0])
    parser.add_argument("config")
    parser.add_argument("--batches", type=int, default=8, help="generator batches of π0 samples (a step's each)")
    parser.add_argument("--settings", default="", help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_intermixed_args()
    names = tuple(n.strip() for n in args.settings.split(",") if n.strip())
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the engines' logs -> stderr; stdout holds the JSON alone
    m = in_fresh_process(measure, args.config, False, args.batches, names, *args.overrides)
    print(json.dumps({"config": args.config, "overrides": args.overrides, **m}, ensure_ascii=False, indent=1), file=out)
    out.close()


if __name__ == "__main__":
    main()
