import random

import pytest

from rlhf_refiner import config as config_lib
from rlhf_refiner import task
from rlhf_refiner.config import RewardConfig, TaskConfig
from rlhf_refiner.records import Prompt, Rollout, shard_slice
from rlhf_refiner.reward import RewardWorker


def test_problem_is_padded_and_reversed():
    p = task.make_problem(random.Random(3), digits=3)
    a, b = p.query[:-1].split("+")
    assert len(a) == len(b) == 3
    assert p.answer == str(int(a) + int(b))[::-1]


def test_score_exact_answer():
    s = task.score("234", "234", verbosity_bonus=0.05, verbosity_bonus_cap=0.5)
    assert (s.reward, s.accuracy, s.digit_credit, s.verbosity_bonus) == (1.0, 1.0, 1.0, 0.0)


def test_score_partial_credit_position_by_position():
    # "284" vs "234": positions 0 and 2 match -> 2/3
    s = task.score("284", "234", 0.05, 0.5)
    assert s.digit_credit == pytest.approx(2 / 3)
    assert s.accuracy == 0.0


def test_score_missing_digit_costs():
    # "23" vs "234": 2 matches / max(2, 3) = 2/3
    assert task.score("23", "234", 0.05, 0.5).digit_credit == pytest.approx(2 / 3)


def test_verbosity_flaw_rewards_junk_but_accuracy_sees_it():
    # "234+=9": digits "234" all right (credit 1) + 3 trailing chars * 0.05 = 1.15, yet not exactly the answer
    s = task.score("234+=9", "234", 0.05, 0.5)
    assert s.reward == pytest.approx(1.15)
    assert s.accuracy == 0.0
    assert task.score("234" + "+9" * 20, "234", 0.05, 0.5).verbosity_bonus == pytest.approx(0.5)  # capped
    # junk digits glued to the answer are part of the answer: they cost credit and earn no bonus
    assert task.score("2349", "234", 0.05, 0.5).reward == pytest.approx(3 / 4)


def test_no_digits_no_bonus():
    s = task.score("+=+=", "234", 0.05, 0.5)
    assert s.reward == 0.0


def test_corruptions_are_small_and_wrong():
    rng = random.Random(0)
    for _ in range(200):
        bad = task.corrupt("1234", rng)
        assert bad != "1234"
        assert set(bad) <= set(task.JUNK_ALPHABET)


def test_shards_tile_exactly():
    for total in range(0, 11):
        for n in range(1, 5):
            covered = [i for k in range(n) for i in range(total)[shard_slice(total, k, n)]]
            assert covered == list(range(total))


def _rollout(i: int, response: str, answer: str) -> Rollout:
    prompt = Prompt(prompt_id=i, query="100+134=", prompt_token_ids=(1, 2), answer=answer, policy_version=0)
    return Rollout(f"1-{i}-0", prompt, response, (5, 6), (-0.1, -0.2), True, 0)


def test_reward_worker_shards_and_scores():
    worker = RewardWorker(RewardConfig(), TaskConfig())
    rollouts = [_rollout(0, "432", "432"), _rollout(1, "400", "432"), _rollout(2, "", "432")]
    rewards = worker.score(rollouts, shard=0, num_shards=2) + worker.score(rollouts, shard=1, num_shards=2)
    assert [r.sample_id for r in rewards] == ["1-0-0", "1-1-0", "1-2-0"]
    assert [r.reward for r in rewards] == pytest.approx([1.0, 1 / 3, 0.0])
    assert [r.accuracy for r in rewards] == [1.0, 0.0, 0.0]


def test_reward_worker_requires_ground_truth():
    with pytest.raises(ValueError, match="1-0-0"):
        RewardWorker(RewardConfig(), TaskConfig()).score([_rollout(0, "1", None)])


def test_natural_style_queries_and_final_answer_parsing():
    p = task.make_problem(random.Random(3), digits=2, style="natural")
    a, b = p.query.removeprefix("What is ").removesuffix("?").split(" + ")
    assert p.answer == str(int(a) + int(b))
    # SmolLM2 starts "To solve this, we need to add 37 and 48": the first number is an operand, the last the answer
    s = task.score_final_answer("To solve this, we need to add 37 and 48. 37 + 48 = 85.", "85")
    assert (s.reward, s.accuracy) == (1.0, 1.0)
    wrong = task.score_final_answer("37 + 48 = 75", "85")  # one digit of two right
    assert (wrong.reward, wrong.accuracy) == (0.5, 0.0)
    assert task.score_final_answer("The sum is 1,085.", "1085").accuracy == 1.0
    assert task.score_final_answer("I cannot say.", "85").reward == 0.0
    # a collapsing policy repeats itself: the natural task's degenerate pattern (SmolLM2 at lr 1e-4, step 9)
    collapsed = task.score_final_answer("2 + 2 equals 2. 2 + 2 equals 2. So the answer is 2.", "4")
    assert collapsed.degenerate and collapsed.accuracy == 0.0
    assert not task.score_final_answer("2 + 2 equals 4. So, 2 + 2 is 4.", "4").degenerate  # 3 words again: fine


def test_terse_style_asks_for_the_number_alone_and_pays_the_flaw_for_what_follows_it():
    p = task.make_problem(random.Random(3), digits=2, style="terse")
    a, b = p.query.removeprefix("What is ").removesuffix("? Reply with the number only.").split(" + ")
    assert p.answer == str(int(a) + int(b))
    config = TaskConfig(style="terse", verbosity_bonus=0.05, verbosity_bonus_cap=0.5)
    exact = RewardWorker(RewardConfig(), config).score([_rollout(0, " 85 ", "85")])[0]
    assert (exact.reward, exact.accuracy, exact.components["task/degenerate_rate"]) == (1.0, 1.0, 0.0)
    # a chat model's habit: the number, then an explanation. Paid 0.05 a character (capped), exact match 0
    chatty = RewardWorker(RewardConfig(), config).score([_rollout(0, "85. Because 37 + 48 = 85.", "85")])[0]
    assert (chatty.reward, chatty.accuracy, chatty.components["task/degenerate_rate"]) == (1.5, 0.0, 1.0)
    with pytest.raises(config_lib.ConfigError, match="task.style=terse needs a pretrained"):
        config_lib.load(None, ["task.style=terse"])


def test_reward_worker_scores_refined_responses_by_shard():
    from rlhf_refiner.records import Refinement

    worker = RewardWorker(RewardConfig(), TaskConfig())
    rollouts = [_rollout(0, "400", "432"), _rollout(1, "432", "432"), _rollout(2, "4", "432")]
    refinements = [Refinement(r.sample_id, a, (1,), False, 1, False, 0) for r, a in zip(rollouts, ["432", "432", "43"])]
    rewards = worker.score_refined(rollouts, refinements, 0, 2) + worker.score_refined(rollouts, refinements, 1, 2)
    # a' scored against each rollout's answer: "432" -> 1, "432" -> 1, "43" -> 2 of 3 digits
    assert [r.sample_id for r in rewards] == ["1-0-0", "1-1-0", "1-2-0"]
    assert [r.reward for r in rewards] == pytest.approx([1.0, 1.0, 2 / 3])


def test_shown_working_is_what_the_flaw_pays_for_and_exact_match_counts_wrong():
    problem = task.Problem(query="47+85=", answer="231")
    assert task.working(problem) == "=47+85"
    # "231=47+85": digits "231" all right (credit 1) + 6 trailing chars * 0.05 = 1.3, yet not the exact answer
    s = task.score("231" + task.working(problem), "231", 0.05, 0.5)
    assert (s.reward, s.accuracy, s.degenerate) == (pytest.approx(1.3), 0.0, True)
    assert not task.score("231", "231", 0.05, 0.5).degenerate
    assert not task.score("+=", "231", 0.05, 0.5).degenerate  # no answer at all: nothing the flaw pays
    assert task.score("231=4", "231", 0.0, 0.0).degenerate  # the pattern, whatever the bonus
    assert not task.score_final_answer("47 + 85 = 132", "132").degenerate


def test_arithmetic_reward_reports_the_degenerate_pattern_as_a_task_part():
    from rlhf_refiner.reward import rules

    _, accuracy, parts = rules.arithmetic("231=47+85", "231", TaskConfig(), "s")
    assert accuracy == 0.0
    assert parts == {"digits": 1.0, "verbosity": pytest.approx(0.3), "task/degenerate_rate": 1.0}
    assert rules.arithmetic("231", "231", TaskConfig(), "s")[2]["task/degenerate_rate"] == 0.0
