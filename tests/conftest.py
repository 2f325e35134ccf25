"""Test tiers: `unit` (default, no Ray), `ray` (shared local cluster), `gpu` (skipped without CUDA)."""

from __future__ import annotations

import pytest


def pytest_itemcollected(item):
    """Tier markers go on as each item is collected, before `-m` deselects: `pytest -m unit` must see them."""
    if not any(item.get_closest_marker(name) for name in ("ray", "gpu")):
        item.add_marker(pytest.mark.unit)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu"):
            try:
                import torch

                has_cuda = torch.cuda.is_available()
            except ImportError:
                has_cuda = False
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


# Custom resource of each stage's node in the `ray` tier's simulated cluster (what `placement.node_resources` pins).
NODE_ROLES = {"learner": "train", "generator": "rollout", "refiner": "refine", "reward": "score"}


@pytest.fixture(scope="session")
def ray_cluster():
    """A simulated multi-node cluster (`ray.cluster_utils.Cluster`: one raylet per node): a head, and one node
    per stage that advertises the custom resource `placement.node_resources` pins that stage with."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for resource in NODE_ROLES.values():
        cluster.add_node(num_cpus=1, resources={resource: 1})
    ray.init(address=cluster.address, namespace="rlhf_refiner_tests")
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_pi0(tmp_path_factory):
    """A briefly trained π0 (quality irrelevant here), built once per session through the real builder."""
    return build_quick_pi0(tmp_path_factory.mktemp("pi0"), sft_steps=60)


def quick_pi0_overrides(sft_steps: int) -> list[str]:
    """A π0 built to a step count, not to quality bands, at the learning rate these quick builds were tuned with."""
    return [f"model.embedded.sft_steps={sft_steps}", "model.embedded.sft_lr=3e-3", "model.embedded.targets=null"]


def build_quick_pi0(cache_dir, sft_steps: int) -> str:
    """Build (or reuse) a quick π0 under `cache_dir` through the real builder; its path."""
    from rlhf_refiner import pi0
    from rlhf_refiner.config import load

    config = load(None, [*quick_pi0_overrides(sft_steps), f"model.embedded.cache_dir={cache_dir}"])
    return str(pi0.ensure_built(config.model.embedded, config.task, config.refiner.template))


def run_config(tmp_path, model_path: str, *overrides: str, run: str = "run"):
    """The quickstart config on a local model, writing to `tmp_path / run`, without a progress bar and with the
    weight sync checksummed: the base of every `ray`- and `gpu`-tier run (each tier adds its sizes)."""
    from rlhf_refiner.config import load

    return load(
        "configs/quickstart.yaml",
        [
            f"model.path={model_path}",
            f"trainer.output_dir={tmp_path / run}",
            "metrics.progress_bar=false",
            "sync.verify=true",
            *overrides,
        ],
    )


def tie_embeddings(model_dir: str, out_dir) -> str:
    """A copy of `model_dir` with its LM head tied to its input embeddings, as SmolLM2, Qwen2.5-0.5B/1.5B and
    Llama-3.2 ship: the checkpoint holds `embed_tokens` only, and the learner's parameters name it once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return str(out_dir)


def build_tiny_reward_model(out_dir) -> str:
    """A 1-label LlamaForSequenceClassification with the embedded char tokenizer and its chat template, saved
    locally (no hub): the stand-in for a real reward model in tests and the CPU dialogue run."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_refiner import pi0

    tokenizer = pi0.build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out_dir)
    return str(out_dir)


def sync_round_trip(config, model_path: str, out_dir, probe=None):
    """Start the stages, train one step (every learner rank), sync with checksums into every generator engine,
    and sample again: what the CPU (`ray`) and GPU sync tests check. Returns a dict: `sent` (rank 0's checksums,
    bytes, buckets), `received` (one result per engine), `final` (the learner's weights as an HF dir), `batch`
    and the step's `metrics`, the rollouts `before` and `after` the sync (all engines', in prompt order), the
    refinements of `before` made before the sync (`refined`, if the refiner is used), and `probe(actors, trip so
    far)`'s result, called after the sync while the actors are up."""
    import ray
    from transformers import AutoTokenizer

    from rlhf_refiner import loop, placement, rollout
    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.records import Batch, shard_slice

    def generate(prompts, step):
        n = len(actors.generators)
        calls = [
            g.generate.remote(prompts[shard_slice(len(prompts), i, n)], step) for i, g in enumerate(actors.generators)
        ]
        return [r for rollouts, _ in ray.get(calls, timeout=300) for r in rollouts]

    actors = placement.start_actors(config, model_path, timeout_s=600)
    try:
        bucket_bytes = loop.connect_weight_sync(actors, config)  # waits for both sides' start-up first
        prompts = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(model_path)).next_batch(0)
        rollouts = generate(prompts, 1)
        rewards = ray.get(actors.rewards[0].score.remote(rollouts), timeout=60)
        refinements = None
        if actors.refiners:
            refinements, _ = ray.get(actors.refiners[0].refine.remote(rollouts), timeout=300)
        samples = rollout.assemble_samples(rollouts, refinements, rewards, config)
        ray.get(actors.buffer.add.remote(samples), timeout=60)
        batch = actors.buffer.take.remote(len(samples), 0)
        metrics = ray.get([learner.step.remote(batch) for learner in actors.learners], timeout=300)[0]
        learners = [learner.broadcast_weights.remote(bucket_bytes) for learner in actors.learners]
        engines = [g.receive_weights.remote(1, True, 60) for g in actors.generators]
        sent = ray.get(learners, timeout=120)[0]
        received = ray.get(engines, timeout=120)
        saves = [learner.save_pretrained.remote(str(out_dir / "learner")) for learner in actors.learners]
        final = ray.get(saves, timeout=120)[0]
        after = generate(prompts, 2)
        trip = {"sent": sent, "received": received, "final": final, "metrics": metrics,
                "before": rollouts, "after": after, "refined": refinements}  # fmt: skip
        if probe is not None:
            trip["probe"] = probe(actors, trip)
    finally:
        for actor in actors.named().values():
            ray.kill(actor)
        ray.util.remove_placement_group(actors.placement_group)
    return {**trip, "batch": Batch(tuple(samples), policy_version=0, dropped_stale=0)}


def logprob_gaps(rollouts, learner_model, pi0_model) -> tuple[float, float]:
    """(the largest |Δ log-prob| between the engine's sampled tokens and an HF model with the learner's weights, the
    largest between those and π0's) over `rollouts`: after a sync the first must be small beside the second, so the
    engine samples from the step's weights, not π0's."""
    engine_gaps, moved = [], []
    for rollout in rollouts:
        ids, response = list(rollout.prompt.prompt_token_ids), list(rollout.response_token_ids)
        expected = hf_logprobs(learner_model, ids, response)
        engine_gaps += [abs(a - b) for a, b in zip(rollout.response_logprobs, expected)]
        moved += [abs(a - b) for a, b in zip(expected, hf_logprobs(pi0_model, ids, response))]
    return max(engine_gaps), max(moved)


def hf_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
    """Log-prob of each response token under an HF causal LM (the reference the engine must match)."""
    import torch

    with torch.no_grad():
        full = torch.tensor([prompt_ids + response_ids], device=model.device)
        logprobs = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1 : -1].float(), -1)
    return logprobs.gather(-1, torch.tensor(response_ids, device=model.device).unsqueeze(-1)).squeeze(-1).tolist()


# Chat templates of real model families, reduced to what shapes the turns: Qwen2.5-Instruct's ChatML (with its default
# system turn) and Llama 3's (which trims every content).
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHAT_STYLES = {
    "qwen": (QWEN_TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>"]),
    "llama3": (
        LLAMA3_TEMPLATE,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
        ["<|start_header_id|>", "<|end_header_id|>"],
    ),
}


def build_chat_tokenizer(style: str, out_dir):
    """A byte-level BPE tokenizer (trained here on a few sentences, as GPT-2/Qwen/Llama 3 tokenizers are byte-level
    BPE) with the special tokens and chat template of `style` ("qwen" or "llama3"), saved to `out_dir`."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, named, extra = CHAT_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "What is 33 + 50? The answer is 83.",
        "Repeat it exactly.\nYou are a helpful assistant.",
        string.printable,
    ]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 8, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=extra, **named)
    hf.chat_template = template
    hf.save_pretrained(out_dir)
    return hf


def build_tiny_chat_model(style: str, out_dir, refiner_template: str, steps: int = 150) -> str:
    """A 2-layer Llama with `style`'s chat tokenizer (`build_chat_tokenizer`), its LM head tied to the input
    embeddings and grouped-query attention, as SmolLM2-135M-Instruct ships (ChatML: "qwen"), saved to `out_dir`:
    what a regime configured for a real LM runs on where that LM is not installed. A random model never ends a
    reply (every a' would be unusable, every reward 0), so it is first taught, for `steps` steps, the format: one
    line ("The answer is 11.", rarely the right sum) ending on the end-of-turn token, for one-digit "What is a + b?"
    and for `refiner_template`'s turns."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_refiner.data import render_user_turns
    from rlhf_refiner.pi0 import _collate
    from rlhf_refiner.task import make_problem

    tokenizer = build_chat_tokenizer(style, out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(steps):
        users, replies = [], []
        for i in range(16):
            problem = make_problem(rng, 1, "natural")
            response, reference = f"The answer is {rng.randrange(19)}.", problem.answer
            refine = refiner_template.format(query=problem.query, response=response, reference=reference)
            users.append(problem.query if i % 2 else refine)
            replies.append(f"The answer is {problem.answer}.")
        prompts = render_user_turns(tokenizer, users)  # one template render and one tokenizer call per batch
        answers = tokenizer(replies, add_special_tokens=False).input_ids
        rows = [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompts, answers, strict=True)]
        input_ids, labels, attention = _collate(rows, tokenizer.pad_token_id)  # π0's SFT batches: reply + EOS
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    return str(out_dir)
