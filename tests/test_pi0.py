"""The embedded π0's SFT mix: how often it is taught to show its work, and that the refiner is taught to strip it."""

import random

import pytest

from rlhf_refiner import pi0, task
from rlhf_refiner.config import EmbeddedModelConfig, TaskConfig

TEMPLATE = "{query}{response}>"


def _examples(tmp_path, n: int, **build) -> list[tuple[str, str]]:
    """(user, assistant) texts of n SFT examples drawn as the builder draws them."""
    tokenizer = pi0.build_tokenizer(tmp_path)
    chat = pi0.ChatEncoder(tokenizer)
    rng = random.Random(0)
    config = EmbeddedModelConfig(**build)
    out = []
    for _ in range(n):
        ids, start = pi0._sft_example(rng, chat, TaskConfig(), TEMPLATE, config)
        assert ids[-1] == tokenizer.eos_token_id
        user = tokenizer.decode(ids[:start], skip_special_tokens=True)
        out.append((user, tokenizer.decode(ids[start:-1])))
    return out


def _shows_work(refine_user: str) -> bool:
    """Whether a refiner example's candidate ends with the query's working (`47+85=231=47+85>`)."""
    query, candidate = refine_user.split("=", 1)
    return candidate.removesuffix(">").endswith("=" + query)


def test_verbose_build_shows_work_at_its_fraction_and_refines_it_away(tmp_path):
    examples = _examples(tmp_path, 4000, refine_fraction=0.5, verbose_fraction=0.1)
    solving = [(u, a) for u, a in examples if ">" not in u]
    refining = [(u, a) for u, a in examples if ">" in u]
    shown = [a for _, a in solving if "=" in a]
    # ~2000 solving examples, a tenth with work shown: binomial sd ~13, so 150..250 is > 3.5 sd either side
    assert 150 < len(shown) < 250
    for user, answer in solving:
        problem = task.Problem(user, answer.split("=")[0])
        assert answer in (problem.answer, problem.answer + task.working(problem))
    # the refiner's target is always the clean answer, also for candidates that show their work
    verbose_candidates = [u for u, _ in refining if _shows_work(u)]
    assert 250 < len(verbose_candidates) < 420  # a third of the corrupted half of ~2000: ~333, sd ~17
    assert all("=" not in a for _, a in refining)


@pytest.mark.parametrize("refine_fraction", [0.0, 0.5])
def test_default_build_never_shows_work(tmp_path, refine_fraction):
    examples = _examples(tmp_path, 1000, refine_fraction=refine_fraction)
    assert all("=" not in answer for _, answer in examples)
    assert not any(_shows_work(u) for u, _ in examples if ">" in u)
