"""`gpu` tier (skipped without CUDA): the same stages on GPUs — vLLM engines, the weight sync over NCCL (or gloo
when learner and generator share the only GPU), and a ZeRO-3 learner. Run on a GPU machine with
`python -m pytest -m gpu`; docs/cluster.md "GPU status" records where they last ran."""

from __future__ import annotations

import json

import pytest
from conftest import build_quick_pi0, hf_logprobs, logprob_gaps, run_config, sync_round_trip, tie_embeddings

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory):
    """The embedded π0 (a real LlamaForCausalLM, untied), built locally: no hub access needed."""
    return build_quick_pi0(tmp_path_factory.mktemp("pi0"), sft_steps=200)


@pytest.fixture(scope="module")
def tied_pi0_dir(pi0_dir, tmp_path_factory):
    """π0 with its LM head tied to its input embeddings, as every paper model has them (Qwen2.5, Llama-3.2)."""
    return tie_embeddings(pi0_dir, tmp_path_factory.mktemp("tied"))


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray

    ray.init(num_cpus=8, num_gpus=_gpus(), namespace="rlhf_refiner_gpu_tests", include_dashboard=False)
    yield ray
    ray.shutdown()


def _layout(gpus: int) -> list[str]:
    """Disaggregated with NCCL on 2+ GPUs; colocated (sleep mode, gloo sync) when there is one."""
    if gpus >= 2:
        return ["learner.num_gpus=1", "generator.engine.num_gpus=1", "sync.backend=nccl"]
    return [
        "placement.layout=colocated",
        "learner.num_gpus=0.5",
        "generator.engine.num_gpus=0.5",
        "generator.engine.enable_sleep_mode=true",
        "generator.engine.gpu_memory_utilization=0.3",
    ]


def _config(tmp_path, model_path, *overrides):
    sizes = ["trainer.steps=2", "data.prompts_per_step=8", "metrics.wandb_mode=disabled", "ray.num_cpus=8"]
    return run_config(tmp_path, model_path, *sizes, *overrides)


def test_vllm_generator_and_refiner_on_gpu(pi0_dir):
    """Both engines on one GPU: sampled responses carry log-probs, and copy-verify writes what greedy decoding
    writes."""
    from transformers import AutoTokenizer

    from rlhf_refiner.config import load
    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.generator import Generator
    from rlhf_refiner.refiner import Refiner

    gpu_engine = ["engine.num_gpus=1", "engine.gpu_memory_utilization=0.3", "engine.enforce_eager=false"]
    engines = [*(f"generator.{o}" for o in gpu_engine), *(f"refiner.{o}" for o in gpu_engine)]
    # copy-verify against plain decoding: not the quickstart's own (gated) refiner
    refiner = ["refiner.copy_verify=true", "refiner.mode=decode", "generator.logprobs=true"]
    config = load("configs/quickstart.yaml", [f"model.path={pi0_dir}", *refiner, *engines])
    source = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(pi0_dir))
    generator = Generator(pi0_dir, config)
    rollouts, metrics = generator.generate(source.next_batch(0), 1)
    assert len(rollouts) == config.data.prompts_per_step * config.generator.group_size
    assert all(len(r.response_logprobs) == len(r.response_token_ids) > 0 for r in rollouts)
    assert metrics["generator/tokens_per_s"] > 0
    refiner = Refiner(pi0_dir, config.refiner, config.model.dtype, config.trainer.seed)
    verified, _ = refiner.refine(rollouts)
    refiner.copy_verify = False
    plain, _ = refiner.refine(rollouts)
    assert [f.refined for f in verified] == [f.refined for f in plain]


def test_weight_sync_round_trip_matches_the_learner(gpu_cluster, pi0_dir, tmp_path):
    """After a learner step and a sync (NCCL with 2 GPUs), every bucket's checksum as received equals the
    learner's, and the engine's log-probs equal an HF model's with the learner's weights."""
    from transformers import AutoModelForCausalLM

    config = _config(
        tmp_path, pi0_dir, "algo.constraint=static_kl", "generator.sampling.temperature=0", "learner.lr=0.01",
        "sync.bucket_mb=0.25", "generator.logprobs=true", *_layout(_gpus()),
    )  # fmt: skip
    trip = sync_round_trip(config, pi0_dir, tmp_path)
    assert trip["sent"]["buckets"] > 1 and trip["received"][0]["checksums"] == trip["sent"]["checksums"]
    hf = AutoModelForCausalLM.from_pretrained(trip["final"]).eval()
    for rollout in trip["after"][:: config.generator.group_size]:
        hf_lp = hf_logprobs(hf, list(rollout.prompt.prompt_token_ids), list(rollout.response_token_ids))
        assert rollout.response_logprobs == pytest.approx(hf_lp, abs=5e-3)


def test_two_steps_with_zero3(gpu_cluster, pi0_dir, tmp_path):
    """The real loop for 2 steps with a ZeRO-3 learner, parameters gathered bucket by bucket for the sync: with
    4+ GPUs two learner ranks partition it (and the refiner gets its own GPU), with 3 one rank and a refiner."""
    from rlhf_refiner import loop

    gpus = _gpus()
    if gpus >= 4:
        fan_out = ["learner.num_ranks=2", "algo.constraint=dynamic", "refiner.engine.num_gpus=1"]
    elif gpus == 3:
        fan_out = ["algo.constraint=dynamic", "refiner.engine.num_gpus=1"]
    else:
        fan_out = ["algo.constraint=static_kl"]
    config = _config(
        tmp_path, pi0_dir, "learner.deepspeed={zero_optimization: {stage: 3}}", "learner.peak_tflops=100",
        *fan_out, *_layout(gpus),
    )  # fmt: skip
    loop.run(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["sync/bytes"] > 0 and 0 < r["learner/mfu"] < 1 and r["learner/tokens_per_s"] > 0 for r in rows)
    assert all(r["learner/samples"] == config.data.prompts_per_step * config.generator.group_size for r in rows)


def test_tied_model_round_trip_after_a_sync(gpu_cluster, tied_pi0_dir, tmp_path):
    """A tied model after a learner step and a sync: the engine's log-probs equal an HF model's with the learner's
    weights, so the tied head moved with the embeddings (the `ray` tier checks the same on CPU)."""
    from transformers import AutoModelForCausalLM

    # sampled, not greedy: tying a trained π0's head to its embeddings makes a model whose greedy groups are
    # identical, which gives GRPO no advantage, so a greedy step would move nothing (seen on CPU)
    config = _config(
        tmp_path, tied_pi0_dir, "algo.constraint=none", "generator.sampling.temperature=1.0", "learner.lr=0.01",
        "sync.bucket_mb=0.25", "generator.logprobs=true", *_layout(_gpus()),
    )  # fmt: skip
    trip = sync_round_trip(config, tied_pi0_dir, tmp_path)
    assert trip["received"][0]["checksums"] == trip["sent"]["checksums"] and trip["metrics"]["learner/grad_norm"] > 0
    hf = AutoModelForCausalLM.from_pretrained(trip["final"]).eval()
    assert hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    gap, moved = logprob_gaps(trip["after"], hf, AutoModelForCausalLM.from_pretrained(tied_pi0_dir).eval())
    assert gap < 5e-3 < 0.05 < moved  # the engine is the learner, which the step moved off π0


@pytest.mark.parametrize("shared", [False, True])
def test_a_lora_adapter_syncs_alone_into_vllms_lora_slot(gpu_cluster, pi0_dir, tmp_path, shared):
    """LoRA with adapter sync on GPU: after a step the engine, serving the base with vLLM's LoRA support
    (`enable_lora`), samples what the merged export scores; on a shared engine the refiner's requests (no adapter)
    still decode as π0. The shared engine takes the generator's whole GPU: on one GPU the learner is on CPU."""
    from transformers import AutoModelForCausalLM

    from rlhf_refiner import engines
    from rlhf_refiner.config import SamplingConfig

    lora = ["model.lora.rank=8", "model.lora.alpha=16", "learner.lr=0.01", "sync.verify=true"]
    sampling = ["generator.sampling.temperature=0", "generator.logprobs=true"]
    layout = _layout(_gpus())
    if shared:
        lora += ["placement.shared_engine=true", "refiner.mode=decode", "refiner.speculative.method=none"]
        layout = layout if _gpus() >= 2 else ["learner.num_gpus=0", "generator.engine.num_gpus=1"]
    config = _config(tmp_path, pi0_dir, "algo.constraint=dynamic", *lora, *sampling, *layout)

    def pi0_decoding(actors, trip):
        if not shared:
            return None
        prompts = [list(r.prompt.prompt_token_ids) for r in trip["after"]]
        params = [engines.sampling_params(SamplingConfig(temperature=0.0, max_new_tokens=12), 0, True)] * len(prompts)

        def decode(generator):
            return [(list(c.token_ids), c.logprobs) for c in engines.complete(generator.refiner.llm, prompts, params)]

        import ray

        return ray.get(actors.generators[0].__ray_call__.remote(decode), timeout=300)

    trip = sync_round_trip(config, pi0_dir, tmp_path, probe=pi0_decoding)
    assert trip["received"][0]["checksums"] == trip["sent"]["checksums"]
    pi0 = AutoModelForCausalLM.from_pretrained(pi0_dir).eval()
    gap, moved = logprob_gaps(trip["after"], AutoModelForCausalLM.from_pretrained(trip["final"]).eval(), pi0)
    assert gap < 5e-3 < 0.05 < moved
    if shared:
        prompts = [list(r.prompt.prompt_token_ids) for r in trip["after"]]
        as_pi0 = [
            abs(a - b)
            for prompt, (ids, logprobs) in zip(prompts, trip["probe"])
            for a, b in zip(logprobs, hf_logprobs(pi0, prompt, ids))
        ]
        assert max(as_pi0) < 5e-3
