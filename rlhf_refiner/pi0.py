"""Builds the embedded CPU π0: a character tokenizer and a tiny Llama, SFT-trained to solve and to refine.

The result is an ordinary HF model dir (`save_pretrained`), loaded downstream by path exactly like a hub model.
It is built to quality bands, not to a step count (`model.embedded.targets`): the SFT stops at the first check
where every band holds, because the same steps give another π0 on another CPU's float kernels. It is cached under
a hash of everything that determines it (build config with its bands and thread count, task, refiner template,
seed, and this file's format version) and rebuilt deterministically on one machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rlhf_refiner import task
from rlhf_refiner.config import ConfigError, EmbeddedModelConfig, TaskConfig

BUILD_FORMAT = 3  # bump when the build procedure changes, so old caches are not reused
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
        print(f"[pi0] cached at {target}: {format_quality(quality)}", flush=True)
        return target
    root.mkdir(parents=True, exist_ok=True)
    bands = _format_bands(build.targets.bands() if build.targets else {})
    until = f"until {bands}, at most {build.sft_steps} SFT steps" if bands else f"for {build.sft_steps} SFT steps"
    print(f"[pi0] building {target.name} {until} (about a minute on 2 cores)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        quality = build_pi0(build, task_config, refiner_template, tmp)
        if target.exists():  # a concurrent build finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except Pi0BuildError as e:  # no π0 is cached; what its checks measured is kept for the user to read
        shutil.rmtree(tmp, ignore_errors=True)
        missed = root / f"{target.name}.missed.json"
        missed.write_text(json.dumps(e.report, indent=2))
        raise Pi0BuildError(f"{e}\nEvery check's values: {missed}", e.report) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[pi0] built at {target}: {format_quality(quality)}", flush=True)
    return target


def format_quality(q: dict) -> str:
    """The one line a run prints about its π0 (and `reproduce_cpu.sh` writes into its table). Older reports (a
    run's summary.json from before π0 was built to bands) lack the build's fields: they are left out."""
    line = f"solve accuracy {q['solve_accuracy']:.1%}, copy-when-correct {q['copy_when_correct']:.1%}, "
    line += f"fix rate {q['fix_rate']:.1%}"
    if "degenerate_rate" in q:
        line += f", degenerate at T=1 {q['degenerate_rate']:.1%}, fixes degenerate {q['fixes_degenerate']:.1%}"
    if "stopped_at_step" in q:
        bands = _format_bands(q["targets"]) or "none"
        line += f"; stopped at SFT step {q['stopped_at_step']} of {q['sft_steps']} (bands: {bands})"
        line += f"; built on {q['cpu']} ({q['cpu_capability']}, torch threads {q['threads']})"
    return line


def _format_bands(bands: dict) -> str:
    """`name [low, high], ...` of bands given as pairs (the config's tuples or quality.json's lists)."""
    return ", ".join(f"{name} [{low}, {high}]" for name, (low, high) in bands.items())


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
        return chat.encode(
            template.format(query=problem.query, response=candidate, reference=problem.answer), problem.answer
        )
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


class Pi0BuildError(ConfigError):
    """A π0 build that reached its step cap outside its quality bands: the build config must change. `report`:
    the values at the cap and at every check."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


def cpu_model() -> str:
    """The CPU's model name (what the build's float kernels follow), as /proc/cpuinfo or the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build_pi0(build: EmbeddedModelConfig, task_config: TaskConfig, template: str, out_dir: Path) -> dict:
    """Train π0 into `out_dir` until it is inside `build.targets` (or for `build.sft_steps` without targets) and
    return its quality report (also saved as quality.json). Raises Pi0BuildError at the cap outside a band."""
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(build.threads)  # part of the cache key: the float reductions follow it
    try:
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
            tie_word_embeddings=False,  # as every published π0 was built; tied models: the ray tier ties a copy
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        held_out = HeldOut(task_config, random.Random(build.seed + 1))
        bands = build.targets.bands() if build.targets is not None else {}
        stopped, checks = _sft(model, tokenizer, build, task_config, template, rng, held_out, bands)
        model.eval()
        quality = measure(model, tokenizer, template, held_out, QUALITY_METRICS)
        targets = {name: list(band) for name, band in bands.items()}
        if bands and not _inside(quality, bands):
            report = {"at_cap": quality, "targets": targets, "checks": checks}
            raise Pi0BuildError(_missed_message(build, bands, checks, quality), report)
        quality.update(
            eval_problems=len(held_out.problems),
            stopped_at_step=stopped,
            sft_steps=build.sft_steps,
            targets=targets,
            checks=checks,
            cpu=cpu_model(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            threads=build.threads,
            torch=torch.__version__,
            build_seconds=round(time.perf_counter() - started, 1),
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out_dir)
        (out_dir / "quality.json").write_text(json.dumps(quality, indent=2))
        return quality
    finally:
        torch.set_num_threads(threads)


def _sft(model, tokenizer, build, task_config, template, rng, held_out, bands) -> tuple[int, list[dict]]:
    """SFT until every band holds at a check (or for `sft_steps` without bands); the step it stopped after, and
    each check's values."""
    chat = ChatEncoder(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=build.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, build.sft_steps // 20)
    checks: list[dict] = []
    for step in range(1, build.sft_steps + 1):
        lr_scale = min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * (step - 1) / build.sft_steps))
        for group in optimizer.param_groups:
            group["lr"] = build.sft_lr * max(lr_scale, 0.02)
        examples = [_sft_example(rng, chat, task_config, template, build) for _ in range(build.sft_batch_size)]
        input_ids, labels, attention = _collate(examples, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if bands and step % build.eval_every == 0:
            model.eval()
            values = measure(model, tokenizer, template, held_out, bands, stop_outside=bands)
            model.train()
            checks.append({"step": step, **values})
            if _inside(values, bands):
                print(f"[pi0] sft step {step}: inside every band ({_format_values(values)})", flush=True)
                return step, checks
        if step % 250 == 0 or step == build.sft_steps:
            print(f"[pi0] sft step {step}/{build.sft_steps} loss {loss.item():.3f}", flush=True)
    return build.sft_steps, checks


def _inside(values: dict[str, float], bands: dict[str, tuple[float, float]]) -> bool:
    return all(name in values and low <= values[name] <= high for name, (low, high) in bands.items())


def _format_values(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in values.items())


def _missed_message(build: EmbeddedModelConfig, bands: dict, checks: list[dict], final: dict) -> str:
    def held(values: dict) -> list[str]:
        return [name for name, (low, high) in bands.items() if name in values and low <= values[name] <= high]

    def outside(values: dict) -> str:
        return "; ".join(
            f"model.embedded.targets.{name} = [{low}, {high}]: {values[name]:.3f}"
            for name, (low, high) in bands.items()
            if name in values and not low <= values[name] <= high
        )

    lines = [
        f"the embedded π0 reached model.embedded.sft_steps = {build.sft_steps} outside its quality bands "
        f"(CPU: {cpu_model()}, torch {torch.__version__}, {build.threads} threads):",
        f"  at the cap: {outside(final)}",
    ]
    if checks:  # the check that held the most bands (the latest of equals): what kept the build from stopping there
        best = max(reversed(checks), key=lambda check: len(held(check)))
        unmeasured = [name for name in bands if name not in best]  # a check stops at its first band outside
        lines.append(
            f"  closest check, at step {best['step']} ({len(checks)} checks, every {build.eval_every} steps): inside "
            f"{', '.join(held(best)) or 'no band'}; outside: {outside(best)}"
            + (f"; not measured after that: {', '.join(unmeasured)}" if unmeasured else "")
        )
    lines.append(
        "A π0 outside its bands would make every number of the run incomparable, so none was cached. Change the "
        "build: a lower model.embedded.sft_lr or a smaller model.embedded.eval_every if it jumped over a band, a "
        "training mix that moves the metric that missed (model.embedded.verbose_fraction, refine_fraction), a wider "
        "band, or more model.embedded.sft_steps if it was still climbing at the cap (the cosine schedule is that "
        "long, so this is another build from step 1); model.embedded.targets=null builds to the step count alone."
    )
    return "\n".join(lines)


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


QUALITY_METRICS = ("solve_accuracy", "copy_when_correct", "fix_rate", "degenerate_rate", "fixes_degenerate")


class HeldOut:
    """The build's held-out problems, drawn once from `rng`: every check and the final report measure these, so a
    value at the stopping check is the value in quality.json."""

    def __init__(self, task_config: TaskConfig, rng: random.Random, n: int = 256) -> None:
        self.problems = [task.make_problem(rng, task_config.digits) for _ in range(n)]
        self.corrupted = [task.corrupt(p.answer, rng) for p in self.problems]
        self.sample_seed = rng.randrange(2**31)
        self.answer_tokens = max(len(p.answer) for p in self.problems) + 1  # + <|end|>; one char per token


def measure(model, tokenizer, template: str, held_out: HeldOut, names, stop_outside: dict | None = None) -> dict:
    """The named quality metrics of π0 on `held_out` (greedy, or T=1 under the held-out seed: deterministic for a
    given model). With `stop_outside`, stops after the first metric outside its band (checks skip the rest)."""
    problems = held_out.problems
    n = len(problems)
    values: dict[str, float] = {}
    for name in [m for m in QUALITY_METRICS if m in names]:
        if name == "solve_accuracy":  # decoding stops one token past the longest answer: a longer response is wrong
            solved = greedy_answers(model, tokenizer, [p.query for p in problems], held_out.answer_tokens)
            values[name] = sum(s == p.answer for s, p in zip(solved, problems)) / n
        elif name == "copy_when_correct":
            users = [template.format(query=p.query, response=p.answer, reference=p.answer) for p in problems]
            values[name] = sum(c == p.answer for c, p in zip(greedy_answers(model, tokenizer, users), problems)) / n
        elif name == "fix_rate":  # and the share of corrupted answers it changed at all (reported, not a band)
            users = [
                template.format(query=p.query, response=c, reference=p.answer)
                for p, c in zip(problems, held_out.corrupted)
            ]
            fixed = greedy_answers(model, tokenizer, users)
            values[name] = sum(f == p.answer for f, p in zip(fixed, problems)) / n
            values["changed_when_corrupted"] = sum(f != c for f, c in zip(fixed, held_out.corrupted)) / n
        elif name == "degenerate_rate":
            # What RL can find: π0's own T=1 samples that carry the flaw's pattern (`task.Score.degenerate`).
            rng_state = torch.get_rng_state()
            try:
                torch.manual_seed(held_out.sample_seed)
                sampled = greedy_answers(model, tokenizer, [p.query for p in problems] * 4, sample=True)
            finally:
                torch.set_rng_state(rng_state)
            flagged = [task.score(s, p.answer, 0.0, 0.0).degenerate for s, p in zip(sampled, problems * 4)]
            values[name] = sum(flagged) / len(flagged)
        else:  # fixes_degenerate: the refiner strips the work from a right answer that shows it
            users = [
                template.format(query=p.query, response=p.answer + task.working(p), reference=p.answer)
                for p in problems
            ]
            stripped = greedy_answers(model, tokenizer, users)
            values[name] = sum(not task.score(f, p.answer, 0.0, 0.0).degenerate for f, p in zip(stripped, problems)) / n
        if stop_outside and name in stop_outside and not stop_outside[name][0] <= values[name] <= stop_outside[name][1]:
            break
    return values
