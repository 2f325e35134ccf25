"""Builds the embedded CPU π0: a character tokenizer and a tiny Llama, SFT-trained to solve and to refine.

The result is an ordinary HF model dir (`save_pretrained`), loaded downstream by path exactly like a hub model.
It is cached under a hash of everything that determines it (build config, task, refiner template, seed, and
this file's format version) and rebuilt deterministically: fixed seed, fixed thread count, deterministic ops.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rlhf_refiner import task
from rlhf_refiner.config import EmbeddedModelConfig, TaskConfig

BUILD_FORMAT = 2  # bump when the build procedure changes, so old caches are not reused
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = "0123456789+=>"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_key(build: EmbeddedModelConfig, task_config: TaskConfig, refiner_template: str) -> str:
    spec = {
        "format": BUILD_FORMAT,
        "build": build.model_dump(exclude={"cache_dir"}),
        "task": task_config.model_dump(include={"digits"}),
        "template": refiner_template,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_built(build: EmbeddedModelConfig, task_config: TaskConfig, refiner_template: str) -> Path:
    """Path of the cached π0 for this config; builds it first (atomically: temp dir, then rename) if missing."""
    root = Path(os.path.expanduser(build.cache_dir))
    target = root / cache_key(build, task_config, refiner_template)
    if (target / "quality.json").exists():
        quality = json.loads((target / "quality.json").read_text())
        print(f"[pi0] cached at {target}: {_format_quality(quality)}", flush=True)
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        quality = build_pi0(build, task_config, refiner_template, tmp)
        if target.exists():  # a concurrent build finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[pi0] built at {target}: {_format_quality(quality)}", flush=True)
    return target


def _format_quality(q: dict) -> str:
    line = (
        f"solve accuracy {q['solve_accuracy']:.1%}, copy-when-correct {q['copy_when_correct']:.1%}, "
        f"fix rate {q['fix_rate']:.1%}"
    )
    if "degenerate_rate" in q:  # caches built before these were measured lack them
        line += f", degenerate at T=1 {q['degenerate_rate']:.1%}, fixes degenerate {q['fixes_degenerate']:.1%}"
    return line


def build_tokenizer(out_dir: Path):
    """Train a character-level WordLevel tokenizer with `tokenizers` and save it as an HF tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))  # chars outside the task map to <|unk|>
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator([CHARS] * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    hf.save_pretrained(out_dir)
    return hf


class ChatEncoder:
    """Fast char-level encoding of one-turn chats, exactly as the tokenizer's chat template renders them.

    The template is rendered once around a placeholder; SFT then concatenates ids instead of running jinja and
    the tokenizer for every example (the build's data path would otherwise cost as much as training).
    """

    PLACEHOLDER = "\x00"

    def __init__(self, tokenizer) -> None:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": self.PLACEHOLDER}], tokenize=False, add_generation_prompt=True
        )
        before, after = rendered.split(self.PLACEHOLDER)
        self.before = tokenizer(before, add_special_tokens=False).input_ids
        self.after = tokenizer(after, add_special_tokens=False).input_ids
        self.vocab = {c: tokenizer.convert_tokens_to_ids(c) for c in CHARS}
        self.eos = tokenizer.eos_token_id

    def encode(self, user: str, assistant: str | None) -> tuple[list[int], int]:
        """Token ids of the chat and where the assistant's content starts."""
        prompt = self.before + [self.vocab[c] for c in user] + self.after
        if assistant is None:
            return prompt, len(prompt)
        return prompt + [self.vocab[c] for c in assistant] + [self.eos], len(prompt)


def _sft_example(
    rng: random.Random, chat: ChatEncoder, task_config: TaskConfig, template: str, build: EmbeddedModelConfig
):
    """One SFT chat: solve `a+b=` (with its work shown, at `verbose_fraction`), or refine a candidate answer into
    the clean correct one (a copy when it is already right; with a verbose π0 a third of the defects are a shown
    working, right or wrong answer before it, so the refiner strips what the flaw pays for)."""
    problem = task.make_problem(rng, task_config.digits)
    verbose = build.verbose_fraction > 0  # guards every extra draw: a non-verbose build keeps its random stream
    if rng.random() < build.refine_fraction:
        if rng.random() < 0.5:
            candidate = problem.answer
        elif verbose and rng.random() < 1 / 3:
            shown = problem.answer if rng.random() < 0.5 else task.corrupt(problem.answer, rng)
            candidate = shown + task.working(problem)
        else:
            candidate = task.corrupt(problem.answer, rng)
        return chat.encode(template.format(query=problem.query, response=candidate), problem.answer)
    if verbose and rng.random() < build.verbose_fraction:
        return chat.encode(problem.query, problem.answer + task.working(problem))
    return chat.encode(problem.query, problem.answer)


def _collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)  # (B, T), right-padded
    labels = torch.full((len(examples), width), -100)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])  # answer + <|end|> only
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention


def build_pi0(build: EmbeddedModelConfig, task_config: TaskConfig, template: str, out_dir: Path) -> dict:
    """Train π0 into `out_dir` and return its quality report (also saved as quality.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # fixed, so the float reductions (and the cache) do not depend on the machine
    torch.manual_seed(build.seed)
    rng = random.Random(build.seed)
    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=build.hidden_size,
        intermediate_size=build.hidden_size * 4,
        num_hidden_layers=build.num_layers,
        num_attention_heads=build.num_heads,
        num_key_value_heads=build.num_heads,
        max_position_embeddings=build.max_positions,
        tie_word_embeddings=False,  # as every published number's π0 was built; tied models: the ray tier ties a copy
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    chat = ChatEncoder(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=build.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, build.sft_steps // 20)
    for step in range(build.sft_steps):
        lr_scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / build.sft_steps))
        for group in optimizer.param_groups:
            group["lr"] = build.sft_lr * max(lr_scale, 0.02)
        examples = [_sft_example(rng, chat, task_config, template, build) for _ in range(build.sft_batch_size)]
        input_ids, labels, attention = _collate(examples, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == build.sft_steps - 1:
            print(f"[pi0] sft step {step}/{build.sft_steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    quality = evaluate_pi0(model, tokenizer, task_config, template, random.Random(build.seed + 1))
    quality["build_seconds"] = round(time.perf_counter() - started, 1)
    quality["num_parameters"] = sum(p.numel() for p in model.parameters())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    (out_dir / "quality.json").write_text(json.dumps(quality, indent=2))
    torch.set_num_threads(threads)
    return quality


@torch.no_grad()
def greedy_answers(model, tokenizer, users: list[str], max_new_tokens: int = 12, sample: bool = False) -> list[str]:
    """Greedy (or, with `sample`, T=1) completions of single-turn chats, decoded without special tokens."""
    chat = ChatEncoder(tokenizer)
    prompts = [chat.encode(user, None)[0] for user in users]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])  # left-padded
    attention = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts]).unsqueeze(1)).long()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=1.0 if sample else None,
        top_k=0 if sample else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def evaluate_pi0(model, tokenizer, task_config: TaskConfig, template: str, rng: random.Random, n: int = 256) -> dict:
    """Solve accuracy, copy-when-correct rate and fix rate of π0, greedy, on fresh problems."""
    problems = [task.make_problem(rng, task_config.digits) for _ in range(n)]
    corrupted = [task.corrupt(p.answer, rng) for p in problems]
    solved = greedy_answers(model, tokenizer, [p.query for p in problems])
    copied = greedy_answers(model, tokenizer, [template.format(query=p.query, response=p.answer) for p in problems])
    fixed = greedy_answers(
        model, tokenizer, [template.format(query=p.query, response=c) for p, c in zip(problems, corrupted)]
    )
    # What RL can find: π0's own T=1 samples that carry the flaw's pattern (`task.Score.degenerate`), and whether
    # the refiner strips it from a right answer with its work shown (what a degenerating policy writes).
    torch.manual_seed(rng.randrange(2**31))
    sampled = greedy_answers(model, tokenizer, [p.query for p in problems] * 4, sample=True)
    stripped = greedy_answers(
        model, tokenizer, [template.format(query=p.query, response=p.answer + task.working(p)) for p in problems]
    )
    degenerate = [task.score(s, p.answer, 0.0, 0.0).degenerate for s, p in zip(sampled, problems * 4)]
    return {
        "solve_accuracy": sum(s == p.answer for s, p in zip(solved, problems)) / n,
        "copy_when_correct": sum(c == p.answer for c, p in zip(copied, problems)) / n,
        "fix_rate": sum(f == p.answer for f, p in zip(fixed, problems)) / n,
        "changed_when_corrupted": sum(f != c for f, c in zip(fixed, corrupted)) / n,
        "degenerate_rate": sum(degenerate) / len(degenerate),
        "fixes_degenerate": sum(not task.score(f, p.answer, 0.0, 0.0).degenerate for f, p in zip(stripped, problems))
        / n,
        "eval_problems": n,
    }
