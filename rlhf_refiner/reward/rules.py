"""Rule rewards, computed in the reward worker: the embedded arithmetic task's score and a format rule.

Each returns the source's value in [0, 1] (arithmetic: plus its flawed bonus) and its named parts.
"""

from __future__ import annotations

from rlhf_refiner import task
from rlhf_refiner.config import TaskConfig


def arithmetic(
    response: str, answer: str | None, config: TaskConfig, sample_id: str
) -> tuple[float, float, dict[str, float]]:
    """(reward, accuracy, parts) of the embedded task: digit credit + the documented verbosity flaw, and whether the
    response carries the pattern the flaw pays for (a `task/` part: a property of the response, not a reward)."""
    if answer is None:
        raise ValueError(
            f"sample {sample_id}: the arithmetic reward needs a ground-truth answer (data.source=arithmetic)"
        )
    if config.style == "natural":
        s = task.score_final_answer(response, answer)
    else:
        s = task.score(response, answer, config.verbosity_bonus, config.verbosity_bonus_cap)
    parts = {"digits": s.digit_credit, "verbosity": s.verbosity_bonus, "task/degenerate_rate": float(s.degenerate)}
    return s.reward, s.accuracy, parts


def well_formed(response: str, finished: bool) -> float:
    """1 when the response is non-empty and ended on its own stop token (not cut off at max_new_tokens)."""
    return float(finished and bool(response.strip()))
