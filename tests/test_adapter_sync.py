"""LoRA with adapter sync and the shared engine, without an engine: which adapter each request carries and when it
changes (a fake vLLM `LLM` records every call), and the config errors that name their fields. The engine itself is
tested in test_weight_sync.py (`ray` tier)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf_refiner.config import ConfigError, load
from rlhf_refiner.records import Prompt

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]
SHARED = [*LORA, "placement.shared_engine=true", "refiner.mode=decode", "refiner.speculative.method=none"]


class FakeLLM:
    """Stands in for `vllm.LLM`: records each batch's LoRA request and each worker call; `fail` makes the next
    adapter receive raise, as a broken sync would."""

    def __init__(self, servable=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
        self.requests: list[object] = []
        self.rpcs: list[tuple[str, tuple]] = []
        self.servable = list(servable)
        self.fail = False

    def generate(self, prompts, sampling_params, use_tqdm, lora_request=None):
        self.requests.append(lora_request)
        done = SimpleNamespace(text="7", token_ids=[7], logprobs=None, finish_reason="stop")
        return [SimpleNamespace(outputs=[done]) for _ in prompts]

    def collective_rpc(self, method, timeout=None, args=()):
        self.rpcs.append((method, args))
        if method == "rlhf_lora_modules":
            return [self.servable]
        if method == "rlhf_receive_adapter" and self.fail:
            raise RuntimeError("weight sync: the learner went away")
        return [{"checksums": [], "peak_buffered_bytes": 0, "load_seconds": 0.0}]

    def reset_prefix_cache(self):
        pass


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from rlhf_refiner import pi0

    out = tmp_path_factory.mktemp("tokenizer")
    pi0.build_tokenizer(out)
    return str(out)


def _generator(monkeypatch, tokenizer_dir, overrides, llm=None):
    import vllm  # noqa: F401  (the LoRARequest the generator builds)

    from rlhf_refiner import engines, generator

    llm = llm or FakeLLM()
    started = {}

    def start(*args, **kwargs):
        started.update(kwargs)
        return llm

    monkeypatch.setattr(engines, "start_engine", start)
    config = load("configs/quickstart.yaml", [f"model.path={tokenizer_dir}", *overrides])
    return generator.Generator(tokenizer_dir, config), llm, started


def _prompts():
    return [Prompt(prompt_id=0, query="12+34=", prompt_token_ids=(5, 6, 7), answer="46", policy_version=0)]


def test_generation_names_the_adapter_of_the_version_the_engine_reports(monkeypatch, tokenizer_dir):
    """No adapter before the first sync (a fresh adapter is zero: the policy is the base); after a sync to version
    v every request names id v + 1; a failed sync leaves the version and the adapter as they were; the shared
    engine's refinements carry none."""
    generator, llm, started = _generator(monkeypatch, tokenizer_dir, SHARED)
    assert started["max_lora_rank"] == 8  # the smallest vLLM size that holds rank 4
    rollouts, _ = generator.generate(_prompts(), step=1)
    assert llm.requests == [None] and rollouts[0].policy_version == 0
    generator.receive_weights(3, verify=False, timeout_s=10)
    method, (verify, adapter_id, peft_config) = llm.rpcs[-1]
    assert method == "rlhf_receive_adapter" and adapter_id == 4 and peft_config["r"] == 4
    rollouts, _ = generator.generate(_prompts(), step=4)
    assert llm.requests[-1].lora_int_id == 4 and rollouts[0].policy_version == 3
    generator.refine(rollouts)
    assert llm.requests[-1] is None  # π0: the base
    llm.fail = True
    with pytest.raises(RuntimeError, match="went away"):
        generator.receive_weights(4, verify=False, timeout_s=10)
    rollouts, _ = generator.generate(_prompts(), step=5)
    assert llm.requests[-1].lora_int_id == 4 and rollouts[0].policy_version == 3


def test_a_shared_engine_refines_with_its_own_engine_settings_and_only_when_the_refiner_is_used(
    monkeypatch, tokenizer_dir
):
    """The refiner on the generator's engine takes that engine's settings (the torch gate scorer's device and
    dtype follow them), and none is built where nothing refines."""
    generator, _, _ = _generator(monkeypatch, tokenizer_dir, [*SHARED, "refiner.engine.dtype=bfloat16"])
    assert generator.refiner.config.engine == generator.config.generator.engine
    generator, _, _ = _generator(monkeypatch, tokenizer_dir, [*SHARED, "algo.constraint=static_kl"])
    assert generator.refiner is None


def test_merged_sync_and_full_fine_tuning_load_weights_into_a_plain_engine(monkeypatch, tokenizer_dir):
    for overrides in ([*LORA, "model.lora.sync=merged"], []):
        generator, llm, started = _generator(monkeypatch, tokenizer_dir, overrides)
        generator.receive_weights(1, verify=False, timeout_s=10)
        generator.generate(_prompts(), step=2)
        assert started["max_lora_rank"] is None and llm.rpcs[-1][0] == "rlhf_receive_weights"
        assert llm.requests == [None] and generator.refiner is None


def test_an_adapter_target_the_engine_cannot_serve_is_refused(monkeypatch, tokenizer_dir):
    """vLLM would drop the adapter of a module it holds no LoRA slot for without a word."""
    llm = FakeLLM(servable=("q_proj", "k_proj", "v_proj", "o_proj"))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules.*\['down_proj', 'gate_proj', 'up_proj'\]"):
        _generator(monkeypatch, tokenizer_dir, LORA, llm)


def test_an_architecture_vllm_serves_without_adapters_is_refused(monkeypatch, tokenizer_dir):
    from rlhf_refiner import engines, generator

    def start(*args, **kwargs):
        raise ValueError("GPT2LMHeadModel does not support LoRA yet.")

    monkeypatch.setattr(engines, "start_engine", start)
    config = load("configs/quickstart.yaml", [f"model.path={tokenizer_dir}", *LORA])
    with pytest.raises(ConfigError, match="model.lora.sync=merged"):
        generator.Generator(tokenizer_dir, config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.rank=16", "model.lora.max_lora_rank=8"], r"model.lora.rank \(16\) is above .* \(8"),
        (["model.lora.rank=600"], r"model.lora.rank \(600\) is above .* \(512"),
        (["model.lora.rank=4", "model.lora.max_lora_rank=12"], r"max_lora_rank \(12\) is not one of vLLM's sizes"),
        (["placement.shared_engine=true"], r"model.lora.rank > 0"),
        ([*LORA, "model.lora.sync=merged", "placement.shared_engine=true"], r"model.lora.sync=adapter"),
        ([*LORA, "placement.shared_engine=true", "refiner.mode=decode"], r"refiner.speculative.method=none"),
        ([*SHARED, "refiner.mode=gated", "refiner.gate_scorer=engine"], r"refiner.gate_scorer=torch"),
        ([*SHARED, "refiner.copy_verify=true"], r"refiner.copy_verify=false"),
        ([*SHARED, "refiner.base_url=http://localhost:1"], r"no refiner.base_url"),
        ([*SHARED, "generator.engine.num_gpus=1", "generator.engine.enable_sleep_mode=true"], r"enable_sleep_mode"),
        (
            [*SHARED, "generator.engine.max_model_len=128", "refiner.engine.max_model_len=256"],
            r"generator.engine.max_model_len >= refiner.engine.max_model_len \(256\)",
        ),
    ],
)
def test_lora_settings_an_engine_cannot_serve_are_refused_naming_the_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load("configs/quickstart.yaml", overrides)


def test_the_engine_rank_is_the_smallest_vllm_size_that_holds_the_adapter():
    ranks = {r: load(None, [f"model.lora.rank={r}"]).model.lora.engine_rank for r in (1, 2, 8, 9, 64, 300)}
    assert ranks == {1: 1, 2: 8, 8: 8, 9: 16, 64: 64, 300: 320}
    assert load(None, ["model.lora.rank=4", "model.lora.max_lora_rank=32"]).model.lora.engine_rank == 32
    assert load("configs/quickstart.yaml", SHARED).placement.shared_engine  # the shared quickstart loads
