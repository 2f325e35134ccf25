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


def sync_round_trip(config, model_path: str, out_dir):
    """Start the stages, train one step, sync with checksums, and sample again: what the CPU (`ray`) and GPU
    sync tests check. Returns (sent, received, final weights dir, rollouts before, rollouts after)."""
    import ray
    from transformers import AutoTokenizer

    from rlhf_refiner import loop, placement
    from rlhf_refiner.data import PromptSource

    actors = placement.start_actors(config, model_path, timeout_s=600)
    try:
        bucket_bytes = loop.connect_weight_sync(actors, config)  # waits for both actors' start-up first
        prompts = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(model_path)).next_batch(0)
        rollouts, _ = ray.get(actors.generator.generate.remote(prompts, 1), timeout=300)
        rewards = ray.get(actors.rewards[0].score.remote(rollouts), timeout=60)
        refinements = None
        if actors.refiner is not None:
            refinements, _ = ray.get(actors.refiner.refine.remote(rollouts), timeout=300)
        samples = loop.assemble_samples(rollouts, refinements, rewards, config)
        ray.get(actors.buffer.add.remote(samples), timeout=60)
        ray.get(actors.learner.step.remote(actors.buffer.take.remote(len(samples), 0)), timeout=300)
        sent, received = ray.get(
            [
                actors.learner.broadcast_weights.remote(bucket_bytes),
                actors.generator.receive_weights.remote(1, True, 60),
            ],
            timeout=120,
        )
        final = ray.get(actors.learner.save_pretrained.remote(str(out_dir / "learner")), timeout=120)
        after, _ = ray.get(actors.generator.generate.remote(prompts, 2), timeout=300)
    finally:
        for actor in [actors.generator, actors.refiner, actors.learner, actors.buffer, *actors.rewards]:
            if actor is not None:
                ray.kill(actor)
        ray.util.remove_placement_group(actors.placement_group)
    return sent, received, final, rollouts, after


def hf_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
    """Log-prob of each response token under an HF causal LM (the reference the engine must match)."""
    import torch

    with torch.no_grad():
        full = torch.tensor([prompt_ids + response_ids], device=model.device)
        logprobs = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1 : -1].float(), -1)
    return logprobs.gather(-1, torch.tensor(response_ids, device=model.device).unsqueeze(-1)).squeeze(-1).tolist()
