"""Generator: the policy's vLLM engine. generate(prompts) -> Rollouts; receives the learner's weights each step.

Each of the G responses of a prompt is its own request with its own seed, derived from (sampling seed, step,
prompt id, index), so generation is reproducible and the G samples differ. `policy_version` is the learner
step whose weights the engine holds; every rollout carries it.

With LoRA and `model.lora.sync: adapter` the engine holds the base weights, never changed, and the policy's
adapter, replaced whole at each sync: every generation request carries the adapter of `policy_version` (vLLM
id `policy_version + 1`), and none before the first sync (a fresh adapter is zero: the policy is the base). With
`placement.shared_engine` the same actor is also the refiner: its requests carry no adapter, so π0 is the base.
Ray runs an actor's calls one at a time, so a sync never lands inside a generation or a refinement.
"""

from __future__ import annotations

import time
from typing import Any

from rlhf_refiner import engines, lora
from rlhf_refiner.config import Config, ConfigError, SamplingConfig
from rlhf_refiner.metrics import redirect_actor_output
from rlhf_refiner.records import Prompt, Refinement, Rollout
from rlhf_refiner.refiner import Refiner
from rlhf_refiner.weight_sync import ParamMeta, WeightReceiver


def request_seed(base: int, step: int, prompt_id: int, index: int) -> int:
    """A distinct, reproducible 63-bit seed per (step, prompt, sample)."""
    return (base * 1_000_003 + step * 7_919 + prompt_id * 104_729 + index) % (2**63 - 1)


def returns_logprobs(config: Config) -> bool:
    """Whether rollouts carry the engine's behaviour log-probs: where TIS reads them, or when asked for."""
    return config.generator.logprobs or config.algo.tis_cap is not None


class Generator:
    def __init__(self, model_path: str, config: Config) -> None:
        redirect_actor_output()  # metrics.actor_output=file: into the run's logs/
        self.config = config
        adapter = config.model.lora
        self.adapter_sync = adapter.rank > 0 and adapter.sync == "adapter"
        try:
            self.llm = engines.start_engine(
                model_path,
                config.generator.engine,
                config.model.dtype,
                config.trainer.seed,
                worker_extension_cls=f"{WeightReceiver.__module__}.{WeightReceiver.__qualname__}",
                # behaviour log-probs of the tempered distribution the tokens were drawn from, as the learner scores
                logprobs_mode="processed_logprobs",
                max_lora_rank=adapter.engine_rank if self.adapter_sync else None,
            )
        except ValueError as e:
            if "does not support LoRA" not in str(e):
                raise
            raise ConfigError(
                f"model.lora.sync=adapter: vLLM cannot serve {model_path} with adapters ({e}); set "
                "model.lora.sync=merged to send merged weights instead (placement.shared_engine needs adapters)"
            ) from None
        if self.adapter_sync:
            self._check_adapter_targets(model_path)
        self.policy_version = 0
        self.adapter: Any = None  # the LoRARequest of the adapter the engine holds; None: the base
        self.asleep = False
        # placement.shared_engine: this engine is also the refiner (π0: the base, requests without the adapter)
        self.refiner = None
        if config.placement.shared_engine and config.uses_refiner:
            # on this engine: its device and dtype are the refiner's (the torch gate scorer's too), not refiner.engine
            refiner = config.refiner.model_copy(update={"engine": config.generator.engine})
            self.refiner = Refiner(model_path, refiner, config.model.dtype, config.trainer.seed, llm=self.llm)

    def _check_adapter_targets(self, model_path: str) -> None:
        """A target module the engine cannot hold an adapter on would be dropped by vLLM without a word, and the
        engine would sample from a policy the learner never trained: refuse it, naming the field."""
        servable = self.llm.collective_rpc(WeightReceiver.rlhf_lora_modules.__name__)[0]
        missing = sorted(set(self.config.model.lora.target_modules) - set(servable))
        if missing:
            raise ConfigError(
                f"model.lora.target_modules: vLLM serves no adapter on {missing} of {model_path} (it can on "
                f"{servable}); leave them out, or set model.lora.sync=merged"
            )

    def generate(
        self,
        prompts: list[Prompt],
        step: int,
        sampling: SamplingConfig | None = None,
        group_size: int | None = None,
        id_prefix: str = "",
    ) -> tuple[list[Rollout], dict[str, float]]:
        """G rollouts per prompt, contiguous per prompt, in prompt order. Held-out evaluation passes its own
        `sampling` and `group_size`, and `id_prefix` to tell its sample ids from training's."""
        self._wake()  # colocated: a further rollout round of the same step (dynamic sampling)
        group_size = group_size or self.config.generator.group_size
        sampling = sampling or self.config.generator.sampling
        requests = [(prompt, k) for prompt in prompts for k in range(group_size)]
        logprobs = returns_logprobs(self.config)
        params = [
            engines.sampling_params(sampling, request_seed(sampling.seed, step, p.prompt_id, k), logprobs)
            for p, k in requests
        ]
        started = time.perf_counter()
        prompt_ids = [list(p.prompt_token_ids) for p, _ in requests]
        completions = engines.complete(self.llm, prompt_ids, params, self.adapter)
        seconds = time.perf_counter() - started
        if self.config.generator.engine.enable_sleep_mode:  # colocated: give the GPU to the learner until the sync
            self.sleep()
        rollouts = [
            Rollout(
                sample_id=f"{id_prefix}{step}-{prompt.prompt_id}-{k}",
                prompt=prompt,
                response=c.text,
                response_token_ids=c.token_ids,
                response_logprobs=c.logprobs,
                finished=c.finished,
                policy_version=self.policy_version,
            )
            for (prompt, k), c in zip(requests, completions)
        ]
        tokens = sum(len(r.response_token_ids) for r in rollouts)
        return rollouts, {
            "generator/tokens_per_s": tokens / max(seconds, 1e-9),
            "generator/response_tokens_mean": tokens / len(rollouts),
            "generator/truncated_frac": sum(not r.finished for r in rollouts) / len(rollouts),
            "generator/policy_version": self.policy_version,
            "time/generate": seconds,
        }

    def sleep(self) -> None:
        """Free the engine's GPU memory (colocated: at start-up, before its learner rank allocates, and after each
        rollout round); `generate` and `receive_weights` wake it."""
        engines.sleep(self.llm)
        self.asleep = True

    def _wake(self) -> None:
        """Level-1 sleep keeps the weights in host memory, so a woken engine holds the weights it slept with."""
        if self.asleep:
            engines.wake_up(self.llm)
            self.asleep = False

    def init_weight_sync(
        self,
        host: str,
        port: int,
        first_rank: int,
        world_size: int,
        metas: list[ParamMeta],
        bucket_bytes: int,
        timeout_s: float,
    ) -> None:
        """Every vLLM worker of this engine (one per TP rank) joins the group as rank `first_rank` + its TP rank,
        aborting the group it was in before (the loop re-forms the group after another engine died)."""
        self.llm.collective_rpc(
            WeightReceiver.rlhf_init_sync.__name__,
            timeout=timeout_s,
            args=(
                host,
                port,
                first_rank,
                world_size,
                timeout_s,
                [(m.name, m.dtype, list(m.shape)) for m in metas],
                bucket_bytes,
                self.config.sync.backend,
            ),
        )

    def receive_weights(self, policy_version: int, verify: bool, timeout_s: float) -> dict:
        """Join the learner's broadcast, load the weights bucket by bucket, and stamp `policy_version`. The result
        (`WeightReceiver.rlhf_receive_weights`) carries the largest `peak_buffered_bytes` of the engine's workers:
        the most received bytes one of them held at once, one bucket when loading streams as it should."""
        self._wake()
        if self.adapter_sync:
            adapter = self._adapter_request(policy_version)
            method = WeightReceiver.rlhf_receive_adapter.__name__
            args = (verify, adapter.lora_int_id, lora.vllm_adapter_config(self.config.model.lora))
        else:
            method, args = WeightReceiver.rlhf_receive_weights.__name__, (verify,)
        results = self.llm.collective_rpc(method, timeout=timeout_s, args=args)
        # Every TP worker receives the full weights; a worker whose checksums differ is the one reported.
        result = dict(next((r for r in results if r["checksums"] != results[0]["checksums"]), results[0]))
        result["peak_buffered_bytes"] = max(r["peak_buffered_bytes"] for r in results)
        if not self.adapter_sync:  # cached KV blocks were computed with the old weights (an adapter's blocks are
            self.llm.reset_prefix_cache()  # keyed by its name, one per version, and π0's stay valid)
        self.policy_version = policy_version
        if self.adapter_sync:  # only now: every worker holds the new adapter
            self.adapter = adapter
        return result

    @staticmethod
    def _adapter_request(policy_version: int) -> Any:
        """The request naming the adapter of `policy_version`, which `WeightReceiver.rlhf_receive_adapter` gave
        the engine as id `policy_version + 1` (vLLM ids start at 1). vLLM reads a request's path only
        for an id it does not hold, which the loop never sends: the path says where the adapter came from."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"policy-v{policy_version}", policy_version + 1, f"rlhf-refiner-sync://v{policy_version}")

    def refine(
        self, rollouts: list[Rollout], shard: int = 0, num_shards: int = 1
    ) -> tuple[list[Refinement], dict[str, float]]:
        """`placement.shared_engine`: the refiner's call (`Refiner.refine`), on this engine's base weights."""
        if self.refiner is None:
            raise RuntimeError("Generator.refine needs placement.shared_engine=true")
        return self.refiner.refine(rollouts, shard, num_shards)
