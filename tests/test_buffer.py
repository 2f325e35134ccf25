import pytest

from rlhf_refiner.buffer import Buffer
from rlhf_refiner.records import Prompt, Reward, Rollout, Sample


def _sample(i: int, version: int) -> Sample:
    prompt = Prompt(i, "1+1=", (1,), "2", version)
    rollout = Rollout(f"{version}-{i}-0", prompt, "2", (3,), (-0.5,), True, version)
    return Sample(rollout, None, Reward(rollout.sample_id, 1.0, 1.0, {}, version), 0.0, version)


def test_fifo_take():
    buf = Buffer(max_staleness=0, capacity=10)
    buf.add([_sample(i, 0) for i in range(4)])
    batch = buf.take(3, learner_version=0)
    assert [s.sample_id for s in batch.samples] == ["0-0-0", "0-1-0", "0-2-0"]
    assert batch.policy_version == 0 and batch.dropped_stale == 0


def test_stale_samples_are_dropped_and_counted():
    buf = Buffer(max_staleness=1, capacity=10)
    buf.add([_sample(0, 0), _sample(1, 1), _sample(2, 2)])
    batch = buf.take(2, learner_version=2)  # version 0 is 2 behind > 1
    assert [s.sample_id for s in batch.samples] == ["1-1-0", "2-2-0"]
    assert batch.dropped_stale == 1
    assert buf.metrics()["buffer/dropped_stale_total"] == 1


def test_take_more_than_available_fails_and_keeps_samples():
    buf = Buffer(max_staleness=0, capacity=10)
    buf.add([_sample(0, 0)])
    with pytest.raises(ValueError, match="1 usable samples, 2 requested"):
        buf.take(2, learner_version=0)
    assert buf.take(1, learner_version=0).samples[0].sample_id == "0-0-0"


def test_capacity_evicts_oldest():
    buf = Buffer(max_staleness=5, capacity=2)
    assert buf.add([_sample(i, 0) for i in range(3)]) == 2
    assert buf.metrics()["buffer/dropped_capacity_total"] == 1
    assert [s.sample_id for s in buf.take(2, 0).samples] == ["0-1-0", "0-2-0"]


def test_state_dict_round_trip():
    buf = Buffer(max_staleness=0, capacity=10)
    buf.add([_sample(i, 0) for i in range(3)])
    buf.take(1, 0)
    restored = Buffer(max_staleness=0, capacity=10)
    restored.load_state_dict(buf.state_dict())
    assert [s.sample_id for s in restored.take(2, 0).samples] == ["0-1-0", "0-2-0"]


def test_failed_take_counts_the_stale_samples_it_popped():
    buf = Buffer(max_staleness=0, capacity=10)
    buf.add([_sample(0, 0), _sample(1, 0), _sample(2, 1)])  # at version 1, the two version-0 samples are stale
    with pytest.raises(ValueError, match="1 usable samples, 2 requested \\(dropped 2 stale\\)"):
        buf.take(2, learner_version=1)
    # The stale ones can never be used again (the learner's version only grows): gone, and counted once.
    assert buf.metrics()["buffer/dropped_stale_total"] == 2 and buf.metrics()["buffer/size"] == 1
    batch = buf.take(1, learner_version=1)
    assert [s.sample_id for s in batch.samples] == ["1-2-0"] and batch.dropped_stale == 0
    assert buf.metrics()["buffer/dropped_stale_total"] == 2
