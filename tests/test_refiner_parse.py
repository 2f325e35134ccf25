"""Refiner contract without an engine: extraction, fallback, unchanged detection, token edit distance."""

import pytest

from rlhf_refiner.engines import greedy_prefix_length
from rlhf_refiner.learner import build_rows
from rlhf_refiner.pi0 import build_tokenizer
from rlhf_refiner.records import Prompt, Reward, Rollout, Sample
from rlhf_refiner.refiner import edit_distance, extract_refined, make_refinement


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _rollout(tokenizer, response: str, finished: bool = True) -> Rollout:
    ids = tuple(tokenizer(response, add_special_tokens=False).input_ids)
    if finished:
        ids += (tokenizer.eos_token_id,)
    prompt_ids = tuple(tokenizer("<|user|>12+34=<|end|><|assistant|>", add_special_tokens=False).input_ids)
    prompt = Prompt(0, "12+34=", prompt_ids, "64", 0)
    return Rollout("1-0-0", prompt, response, ids, tuple(-0.1 for _ in ids), finished, 0)


def test_edit_distance():
    assert edit_distance((1, 2, 3), (1, 2, 3)) == 0
    assert edit_distance((1, 2, 3), (1, 9, 3)) == 1  # substitute
    assert edit_distance((1, 2, 3), (1, 3)) == 1  # delete
    assert edit_distance((), (4, 5)) == 2
    assert edit_distance((1, 2, 3, 4), (2, 3, 4, 5)) == 2


def test_greedy_prefix_length_stops_at_the_first_token_not_ranked_first():
    assert greedy_prefix_length([1, 1, 1]) == 3  # greedy decoding writes the whole candidate
    assert greedy_prefix_length([1, 2, 1]) == 1  # it departs at the second token
    assert greedy_prefix_length([3]) == 0
    assert greedy_prefix_length([]) == 0


def test_extract_plain_and_with_pattern():
    assert extract_refined("64", finished=True, pattern=None) == "64"
    assert extract_refined("Fixed: <a>64</a>", finished=True, pattern=r"<a>(.*?)</a>") == "64"


@pytest.mark.parametrize(
    ("output", "finished", "pattern"),
    [("", True, None), ("   ", True, None), ("6464646464", False, None), ("no tags", True, r"<a>(.*)</a>")],
    ids=["empty", "blank", "truncated", "unextractable"],
)
def test_unusable_outputs_are_none(output, finished, pattern):
    assert extract_refined(output, finished, pattern) is None


def test_copy_is_unchanged_and_reuses_sampled_ids(tokenizer):
    rollout = _rollout(tokenizer, "64")
    refinement = make_refinement(rollout, "64", tokenizer)
    assert refinement.unchanged and not refinement.fallback
    assert refinement.edit_distance == 0
    assert refinement.refined_token_ids == rollout.response_token_ids


def test_fix_counts_token_edits_and_ends_with_eos(tokenizer):
    rollout = _rollout(tokenizer, "64+=9")
    refinement = make_refinement(rollout, "64", tokenizer)
    assert not refinement.unchanged
    assert refinement.edit_distance == 3  # three junk tokens deleted
    assert refinement.refined_token_ids == tuple(tokenizer("64", add_special_tokens=False).input_ids) + (
        tokenizer.eos_token_id,
    )


def test_fallback_copies_response(tokenizer):
    rollout = _rollout(tokenizer, "61")
    refinement = make_refinement(rollout, None, tokenizer)
    assert refinement.fallback and refinement.unchanged
    assert refinement.refined == "61"


def test_build_rows_reuses_policy_row_for_unchanged(tokenizer):
    same = _rollout(tokenizer, "64")
    fixed = _rollout(tokenizer, "65")
    samples = [
        Sample(same, make_refinement(same, "64", tokenizer), Reward("a", 1.0, 1.0), 0.0, 0),
        Sample(fixed, make_refinement(fixed, "64", tokenizer), Reward("b", 0.5, 0.0), 0.0, 0),
    ]
    rows = build_rows(samples, tokenizer.pad_token_id, with_refined=True)
    assert rows.policy_rows == 2
    assert rows.refined_index == [0, 2]  # unchanged reuses row 0; the fix gets its own row 2
    assert rows.input_ids.shape[0] == 3
    prompt_len = len(same.prompt.prompt_token_ids)
    # targets: "6", "4", <|end|> -> positions prompt_len-1 .. prompt_len+1 of the (T-1) grid
    assert rows.target_mask[0].nonzero().flatten().tolist() == [prompt_len - 1, prompt_len, prompt_len + 1]
    assert rows.input_ids[2, prompt_len : prompt_len + 3].tolist() == list(samples[1].refinement.refined_token_ids)
