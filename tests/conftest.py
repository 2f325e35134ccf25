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
