import dataclasses

import pytest

from rlhf_refiner import records
from rlhf_refiner.records import Prompt, Reward, Rollout, Sample


def test_every_record_is_frozen_and_versioned():
    for name in ("Prompt", "Rollout", "Refinement", "Reward", "Sample", "Batch"):
        cls = getattr(records, name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        assert "policy_version" in {f.name for f in dataclasses.fields(cls)}, name
        assert cls.__doc__ and "->" in cls.__doc__, f"{name} must say who produces and consumes it"


def test_sample_id_comes_from_its_rollout_and_records_cannot_change():
    prompt = Prompt(3, "1+1=", (1, 2), "2", 0)
    rollout = Rollout("5-3-1", prompt, "2", (7,), (-0.1,), True, 4)
    sample = Sample(rollout, None, Reward("5-3-1", 1.0, 1.0), 0.5, 4)
    assert sample.sample_id == "5-3-1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.advantage = 1.0
