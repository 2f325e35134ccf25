"""Prompt source (driver side): the embedded arithmetic task, or a real dataset -> chat-templated `Prompt` batches.

Real datasets (`data.source`): Prompt-Collection-v0.1 (dialogue), APPS, HumanEval and MBPP (code, with their
unit tests), loaded with `datasets` from a hub name or from local parquet/JSONL files in the same format.
Rows are validated, filtered and tokenized once, up front; every dropped row is counted in `stats`, and a
malformed row is an error naming the file and row unless `data.skip_invalid`. The order is a seeded
permutation per epoch, so `position` is the whole resumable state: a restored source yields exactly the prompts
an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

from rlhf_refiner import task
from rlhf_refiner.config import ConfigError, DataConfig, EvalConfig, TaskConfig
from rlhf_refiner.records import CodeTests, Prompt

# Code formats and the column that identifies a problem (`task_id` of the completions file in code_eval).
CODE_FORMATS = {"apps": "problem_id", "humaneval": "task_id", "mbpp": "task_id"}
LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


class InvalidRowError(ValueError):
    """A dataset row that does not match its format; the message names the field."""


class NoTestsError(InvalidRowError):
    """A well-formed code row without tests (some APPS rows): skipped and counted, never an error."""


def render_user_turn(tokenizer, user: str) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header, via the tokenizer's chat template."""
    return render_chats(tokenizer, [[("user", user)]])[0]


def render_user_turns(tokenizer, users: list[str]) -> list[list[int]]:
    """`render_user_turn` of many turns in one chat-template call and one batched tokenizer call."""
    return render_chats(tokenizer, [[("user", user)] for user in users])


def render_messages(tokenizer, messages: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> list[int]:
    """Token ids of a conversation ending with the assistant header, via the tokenizer's chat template."""
    return render_chats(tokenizer, [list(messages)])[0]


SENTINEL = "\ue000{}\ue001"  # stands in for a message's content: private-use characters no template alters
SENTINEL_PATTERN = re.compile("\ue000(\\d+)\ue001")  # splits a render into the template's parts and content numbers
CONTENT_AS_RENDERED = (str, str.strip, str.rstrip, str.lstrip)  # what templates do to a content (Llama 3: trim)


def render_chats(tokenizer, chats: list[list[tuple[str, str]]], add_generation_prompt: bool = True) -> list[list[int]]:
    """Token ids of chats rendered with the tokenizer's chat template, every message's content untrusted text.

    A content that spells a special token (`<|im_end|>`, `<|start_header_id|>`, ...) must not become that token:
    a response could otherwise close π0's user turn and write its answer for it, or steer a reward model. A chat
    whose contents spell none is tokenised as rendered; one that does goes through `marker_safe_ids`."""
    if not chats:
        return []
    texts = _render(tokenizer, chats, [[content for _, content in chat] for chat in chats], add_generation_prompt)
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    special = special_tokens_pattern(tokenizer)
    spelled = [i for i, chat in enumerate(chats) if any(special.search(content) for _, content in chat)]
    if spelled:
        safe = marker_safe_ids(
            tokenizer, [chats[i] for i in spelled], [texts[i] for i in spelled], add_generation_prompt
        )
        for i, chat_ids in zip(spelled, safe):
            ids[i] = chat_ids
    return ids


def special_tokens_pattern(tokenizer) -> re.Pattern:
    """A regex of the tokenizer's special tokens' texts, longest first (it matches none when there are none)."""
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else re.compile("(?!)")


def _render(
    tokenizer, chats: list[list[tuple[str, str]]], contents: list[list[str]], generation_prompt: bool
) -> list[str]:
    """The chats' texts through the chat template, each message's content replaced by `contents`'."""
    conversations = [
        [{"role": role, "content": content} for (role, _), content in zip(chat, texts)]
        for chat, texts in zip(chats, contents)
    ]
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt)


def marker_safe_ids(
    tokenizer, chats: list[list[tuple[str, str]]], texts: list[str], add_generation_prompt: bool
) -> list[list[int]]:
    """Token ids of chats (`texts`: as rendered) in which only the template's own special tokens are special.

    Each chat is rendered again around a sentinel per content, which tells the template's own text from the
    contents'; its text is cut at the template's own special tokens only, and each run between them (template text
    and contents together, as a plain tokenisation sees them: a marker-free chat gets exactly its plain ids) is
    tokenised with special tokens split into ordinary pieces. Should the template alter contents beyond trimming
    them, so that they cannot be located, their special-token texts are broken by a word joiner (U+2060).
    Byte-level BPE (GPT-2, Qwen, Llama 3) tokenises each run as a plain tokenisation would (tested); a SentencePiece
    tokenizer that marks a word start only at the start of its input (Metaspace, prepend "first") gives a run after
    a marker a leading word-start piece, so there the ids of a chat that spells a marker differ in that piece."""
    special = special_tokens_pattern(tokenizer)
    sentinels = [[SENTINEL.format(j) for j in range(len(chat))] for chat in chats]
    skeletons = _render(tokenizer, chats, sentinels, add_generation_prompt)
    runs = [_runs(chat, skeleton, text, special) for chat, skeleton, text in zip(chats, skeletons, texts)]
    unlocated = [i for i, chat_runs in enumerate(runs) if chat_runs is None]
    if unlocated:
        broken = [
            [special.sub(lambda m: m.group()[0] + "\u2060" + m.group()[1:], c) for _, c in chats[i]] for i in unlocated
        ]
        for i, text in zip(unlocated, _render(tokenizer, [chats[i] for i in unlocated], broken, add_generation_prompt)):
            runs[i] = _cut(text, special)
    strings = [run for chat_runs in runs for run, is_special in chat_runs if not is_special]
    encoded = iter(tokenizer(strings, add_special_tokens=False, split_special_tokens=True).input_ids if strings else [])
    return [
        [
            t
            for run, is_special in chat_runs
            for t in ([tokenizer.convert_tokens_to_ids(run)] if is_special else next(encoded))
        ]
        for chat_runs in runs
    ]


def _cut(template_text: str, special: re.Pattern) -> list[tuple[str, bool]]:
    """Text whose special-token texts are all the template's own, as (text, is a special token) pieces."""
    pieces, last = [], 0
    for match in special.finditer(template_text):
        pieces += [(template_text[last : match.start()], False), (match.group(), True)]
        last = match.end()
    return [piece for piece in [*pieces, (template_text[last:], False)] if piece[0]]


def _runs(chat: list[tuple[str, str]], skeleton: str, text: str, special: re.Pattern) -> list[tuple[str, bool]] | None:
    """`text`, the chat rendered, as (text, is a special token) runs in which only the template's own special tokens
    are special: the template's parts come from `skeleton`, and between them each content as the template rendered
    it (as is, or trimmed). None when a content cannot be located."""
    pieces_of_skeleton = SENTINEL_PATTERN.split(skeleton)  # part, number, part, number, ..., part
    parts, order = pieces_of_skeleton[::2], [int(j) for j in pieces_of_skeleton[1::2]]
    pieces: list[tuple[str, bool]] = []
    position = 0
    for k, part in enumerate(parts):
        if not text.startswith(part, position):
            return None
        pieces += _cut(part, special)
        position += len(part)
        if k == len(order):
            break
        content, follows = chat[order[k]][1], parts[k + 1]
        for shown in (transform(content) for transform in CONTENT_AS_RENDERED):
            if text.startswith(shown, position) and text.startswith(follows, position + len(shown)):
                break
        else:
            return None
        pieces.append((shown, False))
        position += len(shown)
    if position != len(text):
        return None
    runs: list[tuple[str, bool]] = []  # adjacent ordinary pieces joined: they tokenise together, as in a plain render
    for piece, is_special in pieces:
        if runs and not is_special and not runs[-1][1]:
            runs[-1] = (runs[-1][0] + piece, False)
        elif piece or is_special:
            runs.append((piece, is_special))
    return [run for run in runs if run[0]]


def _string(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise InvalidRowError(f"field '{key}' must be a non-empty string, got {type(value).__name__}")
    return value


def _json_field(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        try:
            return json.loads(value)
        except ValueError as e:
            raise InvalidRowError(f"field '{key}' is not valid JSON ({e})") from None
    return value or None


def code_tests_of(fmt: str, row: dict[str, Any]) -> CodeTests:
    """The unit tests of one APPS / HumanEval / MBPP row, in the harness's case format."""
    if fmt == "apps":
        io = _json_field(row, "input_output")
        if not io:
            raise NoTestsError("field 'input_output' is empty (APPS rows without tests cannot be scored)")
        inputs, outputs = io.get("inputs"), io.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
            raise InvalidRowError("field 'input_output' needs equal-length, non-empty 'inputs' and 'outputs' lists")
        fn_name = io.get("fn_name")
        if fn_name:
            cases = [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
            return CodeTests("call", json.dumps(cases), fn_name=str(fn_name))

        def text(value: Any) -> str:  # some stdio rows store lines as lists
            return "\n".join(map(str, value)) if isinstance(value, list) else str(value)

        cases = [{"input": text(i), "output": text(o)} for i, o in zip(inputs, outputs)]
        return CodeTests("stdio", json.dumps(cases))
    if fmt == "humaneval":
        entry_point = _string(row, "entry_point")
        check = _string(row, "test") + f"\ncheck({entry_point})\n"
        return CodeTests(
            "assert", json.dumps([{"code": check}]), fn_name=entry_point, program_prefix=_string(row, "prompt")
        )
    if fmt == "mbpp":
        asserts = row.get("test_list")
        if not isinstance(asserts, list) or not asserts or not all(isinstance(a, str) for a in asserts):
            raise InvalidRowError("field 'test_list' must be a non-empty list of assert strings")
        setup = row.get("test_setup_code") or ""
        cases = json.dumps([{"code": a} for a in asserts])
        return CodeTests("assert", cases, fn_name=_tested_function(row.get("code"), asserts), setup=str(setup))
    raise ValueError(f"unknown code format '{fmt}'")


def _tested_function(reference: Any, asserts: list[str]) -> str | None:
    """The function of MBPP's reference solution that its asserts call: the judge then takes that name from the
    candidate even where it is a builtin's (a task named `max` would otherwise be judged against the builtin)."""
    import ast

    try:
        defined = {n.name for n in ast.parse(reference).body if isinstance(n, ast.FunctionDef)}
        called = [n.func.id for a in asserts for n in ast.walk(ast.parse(a)) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Name)]  # fmt: skip
    except (SyntaxError, ValueError, TypeError):  # no or an unparsable reference: names come from the asserts alone
        return None
    return next((name for name in called if name in defined), None)


def _query_of(source: str, row: dict[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(query text as the refiner sees it, chat messages for the policy) of one row."""
    if source == "prompt_collection":
        raw = row.get("context_messages")
        if hasattr(raw, "tolist"):  # parquet via pandas gives numpy arrays
            raw = raw.tolist()
        if not isinstance(raw, list) or not raw:
            raise InvalidRowError("field 'context_messages' must be a non-empty list of {role, content}")
        messages = []
        for turn in raw:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
                raise InvalidRowError("field 'context_messages' has a turn without string 'role' and 'content'")
            messages.append((turn["role"], str(turn["content"])))
        if len(messages) == 1:
            return messages[0][1], tuple(messages)
        return "\n\n".join(f"{role}: {content}" for role, content in messages), tuple(messages)
    if source == "apps":
        question = _string(row, "question")
        starter = row.get("starter_code") or ""
        if starter.strip():
            question += f"\n\nUse this starter code:\n```python\n{starter}\n```"
        fn_name = (_json_field(row, "input_output") or {}).get("fn_name")
        how = f"Define `{fn_name}` as in the starter code." if fn_name else "Read from stdin and write to stdout."
        query = f"{question}\n\n{how} Answer with one Python program in a ```python code block."
        return query, (("user", query),)
    if source == "humaneval":
        query = f"Complete this Python function:\n```python\n{_string(row, 'prompt')}```"
        return query, (("user", query),)
    if source == "mbpp":
        example = row["test_list"][0] if isinstance(row.get("test_list"), list) and row["test_list"] else ""
        query = f"{_string(row, 'text')}\nYour code should pass this test:\n{example}\nAnswer with Python code."
        return query, (("user", query),)
    raise ValueError(f"unknown data.source '{source}'")


def held_out_data(data: DataConfig, ev: EvalConfig) -> DataConfig:
    """The data config of the held-out rows: `eval.path` (whole, when it is one local file), else `data.path`'s
    `eval.split`. Never the training rows: a local folder without `eval.split` files, or `data.path` a single file
    with no `eval.path`, is a ConfigError."""
    path = ev.path or data.path
    local = Path(path).expanduser()
    if ev.path is None and local.is_file():
        raise ConfigError(
            f"eval: data.path '{path}' is the one file training uses; give the held-out rows as eval.path"
        )
    if local.is_dir() and not any(f.name.startswith(ev.split) for f in local.iterdir() if f.suffix in LOCAL_SUFFIXES):
        raise ConfigError(f"eval.split '{ev.split}': no file in '{local}' starts with it; set eval.split or eval.path")
    return data.model_copy(update={"path": path, "split": ev.split})


def load_rows(data: DataConfig) -> tuple[list[dict[str, Any]], str]:
    """Raw rows of `data.path` (a local parquet/JSONL file or folder, else a hub dataset name) and a label
    naming where they came from, for error messages."""
    import datasets

    path = Path(data.path).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        files = [f for f in files if f.suffix in LOCAL_SUFFIXES]
        if not files:
            raise FileNotFoundError(f"data.path '{path}': no {'/'.join(LOCAL_SUFFIXES)} files")
        split_files = [f for f in files if f.name.startswith(data.split)] or files
        builder = LOCAL_SUFFIXES[split_files[0].suffix]
        rows = datasets.load_dataset(builder, data_files=[str(f) for f in split_files], split="train")
        label = ", ".join(str(f) for f in split_files)
    else:
        rows = datasets.load_dataset(data.path, split=data.split)
        label = f"{data.path} (split {data.split})"
    return list(rows), label


class PromptSource:
    """Training prompts, and with `eval_config` the held-out ones (`held_out`): the embedded task's are distinct
    problems that training then skips (a drawn one is redrawn from the same seeded stream, so without evaluation
    the stream is unchanged); a real dataset's are a seeded sample of another split or file."""

    def __init__(self, data: DataConfig, task_config: TaskConfig, tokenizer, eval_config: EvalConfig | None = None):
        self.data = data
        self.task = task_config
        self.tokenizer = tokenizer
        self.position = 0  # number of prompts handed out so far, across epochs
        self.stats: dict[str, int] = {}
        self.prompts: list[Prompt] = []  # dataset sources: the valid rows, in file order, version 0
        self._epoch_order: tuple[int, list[int]] = (-1, [])
        if data.source != "arithmetic":
            self.prompts, self.stats = self._load(*load_rows(data))
        self.held_out: list[Prompt] = []
        self._held_out_queries: frozenset[str] = frozenset()
        if eval_config is not None:
            self.held_out = self._held_out(eval_config)
            self._held_out_queries = frozenset(p.query for p in self.held_out)

    def _load(self, rows: list[dict[str, Any]], label: str) -> tuple[list[Prompt], dict[str, int]]:
        data = self.data
        prompts: list[Prompt] = []
        stats = {"rows": len(rows), "skipped_invalid": 0, "dropped_no_tests": 0, "dropped_difficulty": 0}
        stats["dropped_too_long"] = 0
        for row_no, row in enumerate(rows):
            if data.difficulties and row.get("difficulty") not in data.difficulties:
                stats["dropped_difficulty"] += 1
                continue
            try:
                query, messages = _query_of(data.source, row)
                tests = code_tests_of(data.source, row) if data.source in CODE_FORMATS else None
            except NoTestsError:
                stats["dropped_no_tests"] += 1  # APPS rows without tests are skipped and counted (docs/tasks.md)
                continue
            except InvalidRowError as e:
                if not data.skip_invalid:
                    raise InvalidRowError(f"{label}: row {row_no}: {e} (set data.skip_invalid=true to skip)") from None
                stats["skipped_invalid"] += 1
                continue
            token_ids = render_messages(self.tokenizer, messages)
            if data.max_prompt_tokens is not None and len(token_ids) > data.max_prompt_tokens:
                stats["dropped_too_long"] += 1
                continue
            prompts.append(Prompt(len(prompts), query, tuple(token_ids), None, 0, messages, tests))
        stats["prompts"] = len(prompts)
        if not prompts:
            raise ValueError(f"data.path {label}: no usable prompts after filtering ({stats})")
        return prompts, stats

    def _held_out(self, ev: EvalConfig) -> list[Prompt]:
        rng = random.Random(f"{ev.seed}-eval")
        if self.data.source == "arithmetic":
            space = 10 ** (2 * self.task.digits)
            if ev.num_prompts > space // 4:
                raise ConfigError(
                    f"eval.num_prompts ({ev.num_prompts}) would hold out more than a quarter of the {space} "
                    f"problems of task.digits={self.task.digits}; lower it or raise task.digits"
                )
            problems: dict[str, task.Problem] = {}
            while len(problems) < ev.num_prompts:
                problem = task.make_problem(rng, self.task.digits, self.task.style)
                problems.setdefault(problem.query, problem)
            return [self._arithmetic_prompt(i, p, 0) for i, p in enumerate(problems.values())]
        local = Path(self.data.path).expanduser()
        if local.is_dir() and not any(f.name.startswith(self.data.split) for f in local.iterdir()):
            raise ConfigError(  # load_rows would train on every file, the held-out split's among them
                f"data.split '{self.data.split}': no file in '{local}' starts with it, so training would read every "
                "file, the held-out ones too; name the training files after data.split"
            )
        held_out = held_out_data(self.data, ev)
        try:
            rows, label = load_rows(held_out)
        except (ValueError, FileNotFoundError) as e:  # e.g. a hub dataset without that split
            raise ConfigError(f"eval: held-out rows ({held_out.path}, split {ev.split}) did not load: {e}") from None
        prompts, _ = self._load(rows, label)
        picked = sorted(rng.sample(range(len(prompts)), min(ev.num_prompts, len(prompts))))
        return [dataclasses.replace(prompts[i], prompt_id=k) for k, i in enumerate(picked)]

    def _arithmetic_prompt(self, index: int, problem: task.Problem, policy_version: int) -> Prompt:
        return Prompt(
            prompt_id=index,
            query=problem.query,
            prompt_token_ids=tuple(render_user_turn(self.tokenizer, problem.query)),
            answer=problem.answer,
            policy_version=policy_version,
        )

    def _order(self, epoch: int) -> list[int]:
        """Row order of one epoch: a seeded permutation (cached; computed once per epoch)."""
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.prompts)))
            if self.data.shuffle:
                random.Random(f"{self.data.seed}-epoch-{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def prompt(self, index: int, policy_version: int) -> Prompt:
        """The `index`-th prompt of the run (index counts across epochs)."""
        if self.data.source == "arithmetic":
            rng = random.Random(f"{self.data.seed}-{index}")
            problem = task.make_problem(rng, self.task.digits, self.task.style)
            while problem.query in self._held_out_queries:  # held out: the next draw of the same stream
                problem = task.make_problem(rng, self.task.digits, self.task.style)
            return self._arithmetic_prompt(index, problem, policy_version)
        epoch, offset = divmod(index, len(self.prompts))
        row = self.prompts[self._order(epoch)[offset]]
        return Prompt(index, row.query, row.prompt_token_ids, None, policy_version, row.messages, row.tests)

    def next_batch(self, policy_version: int) -> list[Prompt]:
        batch = [self.prompt(self.position + i, policy_version) for i in range(self.data.prompts_per_step)]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
