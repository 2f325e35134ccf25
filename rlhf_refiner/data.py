"""Prompt source (driver side): the embedded arithmetic task -> chat-templated `Prompt` batches.

Prompt i is a pure function of (data.seed, i), so the position is the whole resumable state: a restored
source yields exactly the prompts an uninterrupted run would have.
"""

from __future__ import annotations

import random

from rlhf_refiner import task
from rlhf_refiner.config import DataConfig, TaskConfig
from rlhf_refiner.records import Prompt


def render_user_turn(tokenizer, user: str) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header, via the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


class PromptSource:
    def __init__(self, data: DataConfig, task_config: TaskConfig, tokenizer) -> None:
        self.data = data
        self.task = task_config
        self.tokenizer = tokenizer
        self.position = 0  # index of the next prompt

    def prompt(self, index: int, policy_version: int) -> Prompt:
        problem = task.make_problem(random.Random(f"{self.data.seed}-{index}"), self.task.digits)
        return Prompt(
            prompt_id=index,
            query=problem.query,
            prompt_token_ids=tuple(render_user_turn(self.tokenizer, problem.query)),
            answer=problem.answer,
            policy_version=policy_version,
        )

    def next_batch(self, policy_version: int) -> list[Prompt]:
        batch = [self.prompt(self.position + i, policy_version) for i in range(self.data.prompts_per_step)]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
