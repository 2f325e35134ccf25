"""Model rewards: an HF sequence-classification reward model hosted in its own actor(s), and a remote HTTP
reward endpoint for users who already serve one.

`RewardModel` renders (conversation, response) with the reward model's *own* chat template (the texts as
untrusted: `data.render_chats`), truncated to `max_length` tokens, scores in batches under a deadline, and
returns `Reward` records with the `model` component, weighted. `HttpReward` speaks OpenRLHF's remote-RM protocol
(POST {"query", "prompts", "labels"} -> {"rewards": [...]}), with a timeout and bounded retries; a batch that
still fails is an infrastructure error, never a score. It sends text: the endpoint's own tokenisation decides
whether a response's literal turn markers stay text.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from rlhf_refiner.config import HttpRewardConfig, RewardModelConfig
from rlhf_refiner.data import render_chats
from rlhf_refiner.metrics import redirect_actor_output
from rlhf_refiner.records import Refinement, Reward, Rollout


class RewardModel:
    def __init__(self, config: RewardModelConfig, weight: float, seed: int = 0) -> None:
        redirect_actor_output()  # metrics.actor_output=file: into the run's logs/
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(seed)
        torch.set_num_threads(config.torch_threads)
        self.config, self.weight = config, weight
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"reward.model.path '{config.path}': the reward model's tokenizer has no chat template")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() and config.num_gpus > 0 else "cpu"
        dtype = getattr(torch, config.dtype)
        model = AutoModelForSequenceClassification.from_pretrained(config.path, torch_dtype=dtype)
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward.model.path '{config.path}': expected a 1-label reward head, got {model.config.num_labels}"
            )
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval()
        self.device = device

    def token_ids_of(self, rollouts: list[Rollout], responses: list[str]) -> list[list[int]]:
        """Each conversation + response in the reward model's own chat template, as token ids: the texts are
        untrusted, so a response that spells the template's turn markers does not become them (data.render_chats)."""
        chats = [
            [*(rollout.prompt.messages or (("user", rollout.prompt.query),)), ("assistant", response)]
            for rollout, response in zip(rollouts, responses)
        ]
        return render_chats(self.tokenizer, chats, add_generation_prompt=False)

    def scores(self, token_ids: list[list[int]]) -> list[float]:
        import torch

        values: list[float] = []
        for start in range(0, len(token_ids), self.config.batch_size):
            chunk = [ids[: self.config.max_length] for ids in token_ids[start : start + self.config.batch_size]]
            enc = self.tokenizer.pad({"input_ids": chunk}, return_tensors="pt").to(self.device)
            with torch.no_grad():
                values += self.model(**enc).logits[:, 0].float().tolist()
        return values

    def _rewards(self, rollouts: list[Rollout], responses: list[str], ids: list[str]) -> list[Reward]:
        values = self.scores(self.token_ids_of(rollouts, responses))
        return [
            Reward(sample_id, self.weight * v, None, {"model": v}, r.policy_version)
            for sample_id, r, v in zip(ids, rollouts, values)
        ]

    def score(self, rollouts: list[Rollout], shard: int = 0, num_shards: int = 1) -> list[Reward]:
        """Model rewards of this actor's shard of `rollouts`, in order."""
        from rlhf_refiner.reward import shard_inputs

        return self._rewards(*shard_inputs(rollouts, None, shard, num_shards))

    def score_refined(
        self, rollouts: list[Rollout], refinements: list[Refinement], shard: int = 0, num_shards: int = 1
    ) -> list[Reward]:
        """Model rewards of the refined responses a', this actor's shard."""
        from rlhf_refiner.reward import shard_inputs

        return self._rewards(*shard_inputs(rollouts, refinements, shard, num_shards))


class HttpRewardError(RuntimeError):
    """The remote reward endpoint did not answer usably within its retries."""


class HttpReward:
    def __init__(self, config: HttpRewardConfig) -> None:
        if not config.url:
            raise ValueError("reward.http.url must be set when reward.weights has 'http'")
        self.config = config

    def _post(self, payload: dict) -> list[float]:
        request = urllib.request.Request(
            self.config.url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            body = json.loads(response.read())
        values = body.get(self.config.score_key) if isinstance(body, dict) else None
        if not isinstance(values, list) or len(values) != len(payload["query"]):
            raise HttpRewardError(f"expected '{self.config.score_key}' with {len(payload['query'])} values")
        return [float(v) for v in values]

    def scores(self, prompts: list[str], responses: list[str], labels: list[str]) -> tuple[list[float] | None, str]:
        """Scores of a batch, or (None, last error) once `max_retries` retries have failed."""
        payload = {"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts, "labels": labels}
        error = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._post(payload), ""
            except (OSError, ValueError, HttpRewardError) as e:  # URLError and timeouts are OSErrors
                error = f"{type(e).__name__}: {e}"
                if attempt < self.config.max_retries:
                    time.sleep(min(self.config.backoff_s * 2**attempt, 30))
        return None, f"{self.config.url}: {error}"
