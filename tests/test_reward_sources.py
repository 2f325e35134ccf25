"""Reward sources in the worker and the reward-model actor class: code (sandbox), HTTP endpoint, reward model,
user function, their weighted sum, and infrastructure errors that are flagged instead of scored."""

import json
import pickle
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import build_tiny_reward_model

from rlhf_refiner import pi0
from rlhf_refiner.config import ConfigError, DataConfig, RewardConfig, RewardModelConfig, TaskConfig, load
from rlhf_refiner.data import PromptSource
from rlhf_refiner.records import Prompt, Rollout
from rlhf_refiner.reward import RewardWorker, merge
from rlhf_refiner.reward.model import RewardModel

FIXTURES = Path(__file__).parent / "fixtures"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


def _rollout(prompt: Prompt, response: str, k: int = 0, finished: bool = True) -> Rollout:
    return Rollout(f"1-{prompt.prompt_id}-{k}", prompt, response, (5,), (-0.1,), finished, 0)


@pytest.fixture(scope="module")
def apps_prompts(tmp_path_factory):
    tokenizer = pi0.build_tokenizer(tmp_path_factory.mktemp("tok"))
    data = DataConfig(source="apps", path=str(FIXTURES / "apps.jsonl"), shuffle=False)
    src = PromptSource(data, TaskConfig(), tokenizer)
    return [src.prompt(i, 0) for i in range(2)]  # 4001 (stdio, 3 tests), 4002 (call-based, 3 tests)


@needs_bwrap
def test_code_source_scores_fraction_of_tests_with_format_rule(apps_prompts):
    config = RewardConfig(weights={"code": 1.0, "format": 0.5}, code={"test_timeout_s": 1.0, "max_concurrency": 2})
    worker = RewardWorker(config, TaskConfig())
    stdio, call = apps_prompts
    rollouts = [
        _rollout(stdio, "```python\na, b = map(int, input().split())\nprint(a + b)\n```"),
        _rollout(stdio, "print(3)", 1, finished=False),  # right on 1 of 3 inputs, and cut off
        _rollout(call, "def maxOf(nums):\n    return nums[0]\n", 2),  # right on [[-4, -9]] and [[7]]
    ]
    rewards = worker.score(rollouts)
    # code 1 + 0.5 * format 1; code 1/3 + 0.5 * 0; code 2/3 + 0.5
    assert [r.reward for r in rewards] == pytest.approx([1.5, 1 / 3, 2 / 3 + 0.5])
    assert [r.accuracy for r in rewards] == [1.0, 0.0, 0.0]
    assert rewards[1].components["code_status/wrong_answer"] == 1.0 and rewards[0].components["code_status/ok"] == 1.0
    assert all(r.isolation.startswith("bwrap") and not r.infra_error for r in rewards)


@needs_bwrap
def test_reward_worker_flags_infra_errors(apps_prompts, monkeypatch):
    config = RewardConfig(weights={"code": 1.0}, code={"infra_retries": 1, "max_concurrency": 1})
    worker = RewardWorker(config, TaskConfig())
    monkeypatch.setattr(worker.sandbox, "bwrap", "/nonexistent/bwrap")
    (reward,) = worker.score([_rollout(apps_prompts[0], "print(3)")])
    assert reward.infra_error and reward.components["code_status/infra_error"] == 1.0
    assert reward.error.startswith("code: sandbox did not start:") and "/nonexistent/bwrap" in reward.error


class _Handler(BaseHTTPRequestHandler):
    fail = False
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if type(self).fail:
            self.send_response(500)
            self.end_headers()
            return
        payload = json.dumps({"rewards": [len(q) / 10 for q in body["query"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.fail, _Handler.seen = False, []
    yield f"http://127.0.0.1:{server.server_address[1]}/get_reward"
    server.shutdown()


def test_http_source_speaks_openrlhf_protocol_and_flags_failures(endpoint):
    prompt = Prompt(0, "1+1=", (1,), "2", 0)
    config = RewardConfig(weights={"http": 2.0}, http={"url": endpoint, "backoff_s": 0, "max_retries": 2})
    worker = RewardWorker(config, TaskConfig())
    rewards = worker.score([_rollout(prompt, "2"), _rollout(prompt, "22", 1)])
    assert [r.reward for r in rewards] == pytest.approx([2 * 0.5, 2 * 0.6])  # len("1+1=2") / 10, weighted
    assert _Handler.seen[0] == {"query": ["1+1=2", "1+1=22"], "prompts": ["1+1=", "1+1="], "labels": ["2", "2"]}
    assert all(r.error is None for r in rewards)
    _Handler.fail = True
    rewards = worker.score([_rollout(prompt, "2")])
    assert rewards[0].infra_error and len(_Handler.seen) == 1 + 3  # one call, then three failed tries
    # The endpoint's last error travels with the record, so the samples table and the logs can say what failed.
    assert rewards[0].error == f"http: {endpoint}: HTTPError: HTTP Error 500: Internal Server Error"


def test_reward_model_uses_its_own_chat_template_and_merges(tmp_path):
    path = build_tiny_reward_model(tmp_path / "rm")
    model = RewardModel(RewardModelConfig(path=path, batch_size=2), weight=0.5)
    prompt = Prompt(0, "hi", (1,), None, 0, messages=(("user", "1+1="),))
    rollouts = [_rollout(prompt, r, k) for k, r in enumerate(["2", "3", "2"])]
    ids = model.token_ids_of(rollouts[:1], ["2"])[0]
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}], tokenize=False
    )
    assert ids == model.tokenizer(text, add_special_tokens=False).input_ids  # marker-free: as a plain render
    scored = model.score(rollouts)
    raw = [r.components["model"] for r in scored]
    assert raw[0] == pytest.approx(raw[2], abs=1e-5) and raw[0] != raw[1]  # same text, same score; batching-proof
    assert [r.reward for r in scored] == pytest.approx([0.5 * v for v in raw])
    rule = [r.__class__(r.sample_id, 1.0, 1.0, {"format": 1.0}) for r in scored]
    merged = merge([rule, scored])
    assert [m.reward for m in merged] == pytest.approx([1.0 + 0.5 * v for v in raw])
    assert merged[0].components == {"format": 1.0, "model": raw[0]} and merged[0].accuracy == 1.0
    with pytest.raises(ValueError, match="out of step"):
        merge([rule, scored[::-1]])


def test_merge_keeps_every_scorers_error():
    from rlhf_refiner.records import Reward

    worker = [Reward("a", 0.0, None, infra_error=True, error="http: timed out"), Reward("b", 1.0, None)]
    model = [Reward("a", 0.5, None), Reward("b", 0.0, None, infra_error=True, error="model: CUDA OOM")]
    extra = [Reward("a", 0.0, None, infra_error=True, error="code: sandbox did not start"), Reward("b", 0.0, None)]
    merged = merge([worker, model, extra])
    assert [m.infra_error for m in merged] == [True, True]
    assert [m.error for m in merged] == ["http: timed out; code: sandbox did not start", "model: CUDA OOM"]
    assert merge([[Reward("c", 1.0, None)], [Reward("c", 1.0, None)]])[0].error is None


FUNCTION = FIXTURES / "reward_function.py"


def _function_config(name: str, weights: dict[str, float] | None = None) -> RewardConfig:
    return RewardConfig(weights=weights or {"function": 1.0}, function=f"{FUNCTION}:{name}")


def test_function_source_scores_numbers_and_dicts():
    prompt = Prompt(0, "6*7=", (1,), "42", 0)
    rollouts = [_rollout(prompt, "42"), _rollout(prompt, "41!", 1)]
    rewards = RewardWorker(_function_config("exact"), TaskConfig()).score(rollouts)
    # `exact`: "42" is the answer -> 1; "41!" is not -> -0.1 * 3 characters; a bare number reports no accuracy
    assert [r.reward for r in rewards] == pytest.approx([1.0, -0.3])
    assert [r.components for r in rewards] == [{"function": 1.0}, {"function": pytest.approx(-0.3)}]
    assert [r.accuracy for r in rewards] == [None, None]
    rewards = RewardWorker(_function_config("graded", {"function": 2.0}), TaskConfig()).score(rollouts)
    # `graded`: weight 2 x score 1 (answer found) or 0.5; its accuracy; its other key as a part
    assert [r.reward for r in rewards] == [2.0, 1.0]
    assert [r.accuracy for r in rewards] == [1.0, 0.0]
    assert rewards[1].components == {"function": 0.5, "function/length": 3.0}
    assert not any(r.infra_error or r.error for r in rewards)


@pytest.mark.parametrize("order", [("arithmetic", "function"), ("function", "arithmetic")])
def test_function_source_sums_with_arithmetic_and_its_accuracy_wins(order):
    prompt = Prompt(0, "100+134=", (1,), "432", 0)
    rollouts = [_rollout(prompt, "432."), _rollout(prompt, "400", 1)]
    weights = {"arithmetic": 1.0, "function": 0.5}
    graded = RewardWorker(_function_config("graded", {k: weights[k] for k in order}), TaskConfig())
    rewards = graded.score(rollouts)
    # arithmetic: "432." -> digits 1 + flaw 0.05 for ".", not exact; "400" -> 1 of 3 digits. graded: 1; 0.5
    assert [r.reward for r in rewards] == pytest.approx([1.05 + 0.5 * 1.0, 1 / 3 + 0.5 * 0.5])
    assert rewards[0].components == {
        "digits": 1.0,
        "verbosity": pytest.approx(0.05),
        "task/degenerate_rate": 1.0,
        "function": 1.0,
        "function/length": 4.0,
    }
    assert [r.accuracy for r in rewards] == [1.0, 0.0]  # the function's (laxer) verdict, not the rule's 0
    exact = RewardWorker(_function_config("exact", {k: weights[k] for k in order}), TaskConfig())
    rewards = exact.score(rollouts)
    # exact: -0.1 * 4 and -0.1 * 3 characters; a bare number leaves the rule's accuracy alone
    assert [r.reward for r in rewards] == pytest.approx([1.05 - 0.5 * 0.4, 1 / 3 - 0.5 * 0.3])
    assert [r.accuracy for r in rewards] == [0.0, 0.0]


def test_function_text_travels_with_the_config(tmp_path, monkeypatch):
    file = tmp_path / "my_reward.py"
    file.write_text("def fn(query, response, answer, sample_id):\n    return len(response)\n")
    monkeypatch.chdir(tmp_path)  # a relative path starts at the working directory
    config = RewardConfig(weights={"function": 1.0}, function="my_reward.py:fn")
    assert config.model_dump()["function"] == "my_reward.py:fn" and "def fn" not in str(config.model_dump())
    file.write_text("def fn(**kwargs):\n    return -1.0\n")  # edited after validation...
    shipped = pickle.loads(pickle.dumps(config))  # ...what an actor on another node receives...
    file.unlink()  # ...where the file does not exist
    monkeypatch.chdir(FIXTURES)
    (reward,) = RewardWorker(shipped, TaskConfig()).score([_rollout(Prompt(0, "q", (1,), None, 0), "abc")])
    assert reward.reward == 3.0  # len("abc"), the validated text


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("as_text", ": the return value '1.0' is a str, not a number"),
        ("no_score", ": returned a dict without 'score' (its keys: accuracy)"),
        ("nan_part", ": 'confidence' is nan, not a finite number"),
        ("broken", " raised KeyError: 'abc'"),
    ],
)
def test_function_bugs_stop_the_run_naming_function_and_sample(name, error):
    worker = RewardWorker(_function_config(name), TaskConfig())
    prompt = Prompt(0, "q", (1,), "a", 0)
    with pytest.raises((TypeError, ValueError, RuntimeError)) as raised:  # raised: not scored 0, not an infra error
        worker.score([_rollout(prompt, "abc", 1)])
    assert str(raised.value) == f"reward.function {FUNCTION}:{name} on sample 1-0-1{error}"


def _line_of(text: str) -> int:
    return FUNCTION.read_text().splitlines().index(text) + 1


CALL = "(query=..., response=..., answer=..., sample_id=...)"


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("reward_function.py", "reward.function must be 'path/to/file.py:function_name', not 'reward_function.py'"),
        ("reward_function:exact", "reward.function must be 'path/to/file.py:function_name', not 'reward_function:ex"),
        ("reward_function.py:2x", "reward.function must be 'path/to/file.py:function_name', not 'reward_function.py"),
        (
            "missing.py:exact",
            f"reward.function: file not found: missing.py (relative to the working directory {FIXTURES})",
        ),
        (
            "reward_function.py:absent",
            "reward.function: reward_function.py defines no top-level function 'absent' (its functions: exact, graded,",
        ),
        ("reward_function.py:_Verdict", "defines no top-level function '_Verdict'"),
        (
            "reward_function.py:narrow",
            f"reward.function: reward_function.py:narrow (line {_line_of('def narrow(response, answer):')}) is called "
            f"as narrow{CALL} but takes no query, sample_id; add them, or **kwargs",
        ),
        ("reward_function.py:wants_more", f"wants_more{CALL} but requires tokenizer"),
        ("reward_function.py:later", f"later (line {_line_of('async def later(**kwargs):')}) is async"),
    ],
)
def test_function_config_errors_name_the_field_and_file(function, error, monkeypatch):
    monkeypatch.chdir(FIXTURES)
    with pytest.raises(ValueError, match=re.escape(error)):
        RewardConfig(weights={"function": 1.0}, function=function)


def test_function_syntax_error_names_file_and_line(tmp_path):
    file = tmp_path / "bad.py"
    file.write_text("def fn(**kwargs):\n    return 1.0\n\nif fn\n")
    overrides = ["reward.weights={function: 1.0}", f"reward.function={file}:fn"]
    with pytest.raises(ConfigError, match=re.escape(f"reward: Value error, reward.function: {file}, line 4: syntax")):
        load(overrides=overrides)


def test_function_weight_and_path_go_together():
    with pytest.raises(ConfigError, match=re.escape("reward.weights has 'function' but reward.function is not set")):
        load(overrides=["reward.weights={function: 1.0}"])
    with pytest.raises(ConfigError, match=re.escape("reward.function is set but reward.weights has no 'function'")):
        load(overrides=[f"reward.function={FUNCTION}:exact"])
    assert load(overrides=["reward.weights={function: 1.0}", f"reward.function={FUNCTION}:exact"]).reward.function
