"""Dataset loaders on fixture files in the real formats: parsing, filters, counted drops, errors, resumable order."""

import json
from pathlib import Path

import pytest

from rlhf_refiner import pi0
from rlhf_refiner.config import DataConfig, TaskConfig, load
from rlhf_refiner.data import InvalidRowError, PromptSource

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return pi0.build_tokenizer(tmp_path_factory.mktemp("tok"))  # the embedded char tokenizer, with a chat template


def source(tokenizer, **fields) -> PromptSource:
    return PromptSource(DataConfig(prompts_per_step=2, **fields), TaskConfig(), tokenizer)


def test_prompt_collection_parquet_renders_context_messages(tokenizer):
    src = source(tokenizer, source="prompt_collection", path=str(FIXTURES / "prompt_collection"), shuffle=False)
    assert src.stats == {
        "rows": 4, "skipped_invalid": 0, "dropped_no_tests": 0, "dropped_difficulty": 0, "dropped_too_long": 0,
        "prompts": 4,
    }  # fmt: skip
    first, multi = src.prompt(0, 0), src.prompt(1, 0)
    assert first.query == "Name a prime number." and first.messages == (("user", "Name a prime number."),)
    assert multi.query.startswith("user: What is 2+2?\n\nassistant: 4\n\nuser: And 3+3?")
    expected = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in multi.messages], tokenize=False, add_generation_prompt=True
    )
    assert expected.count("<|user|>") == 2  # every turn went through the policy's chat template
    assert list(multi.prompt_token_ids) == tokenizer(expected, add_special_tokens=False).input_ids
    assert first.tests is None and first.answer is None


def test_max_prompt_tokens_drops_and_counts(tokenizer):
    src = source(tokenizer, source="prompt_collection", path=str(FIXTURES / "prompt_collection"), max_prompt_tokens=120)
    assert src.stats["dropped_too_long"] == 1 and src.stats["prompts"] == 3  # the 200-char counting prompt
    assert all(len(src.prompt(i, 0).prompt_token_ids) <= 120 for i in range(3))


def test_malformed_row_names_file_and_row_or_is_skipped_and_counted(tokenizer):
    bad = FIXTURES / "prompt_collection_bad.jsonl"
    with pytest.raises(InvalidRowError, match=r"prompt_collection_bad.jsonl: row 1: field 'context_messages'"):
        source(tokenizer, source="prompt_collection", path=str(bad))
    src = source(tokenizer, source="prompt_collection", path=str(bad), skip_invalid=True)
    assert src.stats["skipped_invalid"] == 1 and src.stats["prompts"] == 2


def test_apps_rows_give_stdio_and_call_tests_and_count_rows_without_tests(tokenizer):
    src = source(tokenizer, source="apps", path=str(FIXTURES / "apps.jsonl"), shuffle=False)
    assert src.stats["dropped_no_tests"] == 1 and src.stats["prompts"] == 3
    stdio, call = src.prompt(0, 0), src.prompt(1, 0)
    assert stdio.tests.kind == "stdio"
    assert json.loads(stdio.tests.cases_json)[1] == {"input": "10 -3\n", "output": "7\n"}
    assert call.tests.kind == "call" and call.tests.fn_name == "maxOf"
    assert json.loads(call.tests.cases_json)[0] == {"input": [[1, 5, 2]], "output": [5]}
    assert "Use this starter code" in call.query and "Read from stdin" in stdio.query


def test_apps_difficulty_filter(tokenizer):
    src = source(tokenizer, source="apps", path=str(FIXTURES / "apps.jsonl"), difficulties=["competition"])
    assert src.stats["dropped_difficulty"] == 3 and src.stats["prompts"] == 1
    assert src.prompt(0, 0).tests.kind == "stdio"


def test_humaneval_and_mbpp_tests(tokenizer):
    he = source(tokenizer, source="humaneval", path=str(FIXTURES / "humaneval.jsonl"), shuffle=False).prompt(0, 0)
    assert he.tests.kind == "assert" and he.tests.fn_name == "add" and he.tests.program_prefix.startswith("def add(")
    assert json.loads(he.tests.cases_json)[0]["code"].endswith("check(add)\n")
    mb = source(tokenizer, source="mbpp", path=str(FIXTURES / "mbpp.jsonl"), shuffle=False).prompt(0, 0)
    assert [c["code"] for c in json.loads(mb.tests.cases_json)][1] == "assert square(-3) == 9"
    assert "assert square(2) == 4" in mb.query


def test_seeded_order_resumes_exactly_and_wraps_epochs(tokenizer):
    args = {"source": "apps", "path": str(FIXTURES / "apps.jsonl"), "seed": 5}
    straight = source(tokenizer, **args)
    ids = [p.tests.cases_json for _ in range(4) for p in straight.next_batch(0)]  # 8 prompts over 3 rows
    assert sorted(ids[:3]) == sorted(ids[3:6])  # each epoch is a permutation of all rows
    resumed = source(tokenizer, **args)
    resumed.next_batch(0)
    state = resumed.state_dict()
    restored = source(tokenizer, **args)
    restored.load_state_dict(state)
    assert [p.tests.cases_json for _ in range(3) for p in restored.next_batch(0)] == ids[2:]
    assert [p.prompt_id for p in restored.next_batch(0)] == [8, 9]


def test_code_reward_needs_a_code_source_and_dataset_needs_a_path():
    with pytest.raises(ValueError, match="reward.weights has 'code'"):
        load(None, ["reward.weights={code: 1.0}"])
    with pytest.raises(ValueError, match="data.source=apps needs data.path"):
        load(None, ["data.source=apps", "reward.weights={code: 1.0}"])
    with pytest.raises(ValueError, match="reward.model.path is not set"):
        load(None, ["reward.weights={model: 1.0}", "data.source=prompt_collection", "data.path=x"])


def test_held_out_problems_are_distinct_and_never_trained_on(tokenizer):
    from rlhf_refiner.config import EvalConfig

    data = DataConfig(prompts_per_step=2)
    plain = PromptSource(data, TaskConfig(), tokenizer)
    evaluated = PromptSource(data, TaskConfig(), tokenizer, EvalConfig(num_prompts=200))
    held_out = {p.query for p in evaluated.held_out}
    assert len(evaluated.held_out) == len(held_out) == 200
    assert [p.prompt_id for p in evaluated.held_out] == list(range(200))
    assert all(p.prompt_token_ids == tuple(pi0_prompt(tokenizer, p.query)) for p in evaluated.held_out[:3])
    redrawn = 0
    for index in range(3000):  # 3000 draws from 10,000 problems: ~60 would land on the 200 held out
        before, after = plain.prompt(index, 0), evaluated.prompt(index, 0)
        assert after.query not in held_out
        if before.query in held_out:
            redrawn += 1
        else:  # the stream is otherwise the one a run without evaluation trains on
            assert after == before
    assert redrawn > 20
    assert plain.held_out == []


def pi0_prompt(tokenizer, query):
    from rlhf_refiner.data import render_user_turn

    return render_user_turn(tokenizer, query)


def test_held_out_rows_come_from_another_split_never_the_training_files(tokenizer, tmp_path):
    import shutil

    from rlhf_refiner.config import ConfigError, EvalConfig

    folder = tmp_path / "pc"
    folder.mkdir()
    parquet = FIXTURES / "prompt_collection" / "train-00000-of-00001.parquet"
    shutil.copy(parquet, folder / "train-00000-of-00001.parquet")
    data = DataConfig(prompts_per_step=2, source="prompt_collection", path=str(folder))
    with pytest.raises(ConfigError, match="eval.split 'test': no file in .* starts with it"):
        PromptSource(data, TaskConfig(), tokenizer, EvalConfig())
    shutil.copy(parquet, folder / "test-00000-of-00001.parquet")
    src = PromptSource(data, TaskConfig(), tokenizer, EvalConfig(num_prompts=3))
    assert [p.prompt_id for p in src.held_out] == [0, 1, 2]  # a seeded sample of the 4 test rows, renumbered
    assert src.stats["rows"] == 4  # training read only its own split
    one_file = DataConfig(
        prompts_per_step=2, source="prompt_collection", path=str(folder / "train-00000-of-00001.parquet")
    )
    with pytest.raises(ConfigError, match="give the held-out rows as eval.path"):
        PromptSource(one_file, TaskConfig(), tokenizer, EvalConfig())
    elsewhere = EvalConfig(path=str(folder / "test-00000-of-00001.parquet"), num_prompts=10)
    assert len(PromptSource(one_file, TaskConfig(), tokenizer, elsewhere).held_out) == 4  # all, when fewer


def test_held_out_share_of_a_small_task_is_capped():
    from rlhf_refiner.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval.num_prompts \(200\) would hold out more than a quarter of the 100"):
        load(None, ["task.digits=1", "trainer.eval_every=5"])
    load(None, ["task.digits=1"])  # no evaluation, nothing held out


def test_with_evaluation_on_training_never_falls_back_to_every_file(tokenizer, tmp_path):
    import shutil

    from rlhf_refiner.config import ConfigError, EvalConfig

    parquet = FIXTURES / "prompt_collection" / "train-00000-of-00001.parquet"
    shutil.copy(parquet, tmp_path / "data-00000.parquet")  # not named after data.split
    shutil.copy(parquet, tmp_path / "test-00000.parquet")
    data = DataConfig(prompts_per_step=2, source="prompt_collection", path=str(tmp_path))
    assert PromptSource(data, TaskConfig(), tokenizer).stats["rows"] == 8  # no evaluation: every file, as before
    with pytest.raises(ConfigError, match="data.split 'train': no file in .* starts with it"):
        PromptSource(data, TaskConfig(), tokenizer, EvalConfig())


def test_a_held_out_set_larger_than_a_quarter_of_the_task_is_refused_not_drawn_forever(tokenizer):
    from rlhf_refiner.config import ConfigError, EvalConfig

    with pytest.raises(ConfigError, match=r"more than a quarter of the 100 problems of task.digits=1"):
        PromptSource(DataConfig(prompts_per_step=2), TaskConfig(digits=1), tokenizer, EvalConfig(num_prompts=200))


def test_batched_user_turns_render_exactly_as_one_at_a_time(tokenizer):
    """The refiner renders a batch's templates in one chat-template and one tokenizer call; each row must be the
    ids a single render gives (empty and multi-line turns included)."""
    from rlhf_refiner.data import render_user_turn, render_user_turns

    users = ["12+34=46>", "", "a\nb c", "99+99=891>"]
    assert render_user_turns(tokenizer, users) == [render_user_turn(tokenizer, u) for u in users]
    assert render_user_turns(tokenizer, []) == []
