"""Test tiers: `unit` (default, no Ray), `ray` (shared local cluster), `gpu` (skipped without CUDA)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.iter_markers(name) for name in ("ray", "gpu")):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu"):
            try:
                import torch

                has_cuda = torch.cuda.is_available()
            except ImportError:
                has_cuda = False
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
