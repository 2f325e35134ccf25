"""What a model's own files say never leaks into sampling unasked: a `generation_config.json` with a repetition
penalty, top-k/top-p and do_sample changes neither `scripts/evaluate.py`'s greedy decoding nor the sampling fields
our engines and a served refiner are sent."""

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAKY = {"repetition_penalty": 5.0, "top_k": 20, "top_p": 0.8, "min_p": 0.2, "do_sample": True, "temperature": 0.7}


@pytest.fixture(scope="module")
def leaky_model(tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer whose generation_config.json sets Qwen-like sampling defaults,
    the repetition penalty at 5 (greedy decoding of a random model repeats tokens: a penalty changes its output)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rlhf_refiner import pi0

    out = tmp_path_factory.mktemp("leaky")
    tokenizer = pi0.build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, **LEAKY)
    model.save_pretrained(out)
    return str(out), tokenizer


def plain_greedy(model, prompt_ids: list[int], steps: int, stop_ids: tuple[int, ...]) -> list[int]:
    """Greedy decoding by hand: the argmax of the model's logits, one token at a time."""
    import torch

    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt_ids) :]


def test_evaluate_decodes_greedily_whatever_generation_config_json_says(leaky_model):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_refiner.config import SamplingConfig
    from rlhf_refiner.data import render_user_turn

    path, tokenizer = leaky_model
    spec = importlib.util.spec_from_file_location("evaluate", ROOT / "scripts/evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.generation_config.repetition_penalty == 5.0  # the file is read: the leak is there to be had

    class P:  # the one field generate() reads of a Prompt
        def __init__(self, ids):
            self.prompt_token_ids = tuple(ids)

    prompts = [P(render_user_turn(tokenizer, q)) for q in ("12+34=", "99+01=", "50+50=")]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
    stops = (tokenizer.eos_token_id,)
    outputs = evaluate.generate(model, tokenizer, prompts, greedy, 1, 2, stops)
    for (index, ids, _), prompt in zip(outputs, prompts):
        assert ids == plain_greedy(model, list(prompt.prompt_token_ids), 24, stops), index
    repeats = [ids for _, ids, _ in outputs if len(set(ids)) < len(ids)]
    assert repeats  # the greedy outputs repeat tokens: a penalty of 5 would have changed them


def test_engine_requests_pin_every_field_that_shapes_the_distribution(monkeypatch):
    import vllm

    from rlhf_refiner import engines
    from rlhf_refiner.config import EngineConfig, SamplingConfig

    params = engines.sampling_params(SamplingConfig(temperature=0.0, top_p=1.0), seed=1, logprobs=False)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (params.top_k, params.min_p, params.temperature, params.top_p) in ((0, 0.0, 0.0, 1.0), (-1, 0.0, 0.0, 1.0))
    built = {}
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: built.update(kwargs))
    engines.start_engine("some/model", EngineConfig(), "float32", 0)
    assert built["generation_config"] == "vllm"  # the engine's own defaults are neutral too, not the model's


def test_a_served_refiner_is_sent_every_sampling_field(leaky_model):
    """refiner.base_url: a stand-in OpenAI-compatible server records the request; every field `vllm serve` would
    otherwise fill from generation_config.json is in it."""
    from rlhf_refiner.config import RefinerConfig
    from rlhf_refiner.records import Prompt, Rollout
    from rlhf_refiner.refiner import Refiner

    path, tokenizer = leaky_model
    seen = []

    class Server(BaseHTTPRequestHandler):
        def _reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - the http.server API
            self._reply({"object": "list", "data": [{"id": "pi0", "object": "model", "created": 0, "owned_by": "x"}]})

        def do_POST(self):  # noqa: N802
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            choices = [
                {"index": i, "text": "46", "finish_reason": "stop", "logprobs": None}
                for i in range(len(seen[-1]["prompt"]))
            ]
            self._reply({"id": "c", "object": "text_completion", "created": 0, "model": "pi0", "choices": choices})

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = RefinerConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", mode="decode")
        refiner = Refiner(path, config, "float32", seed=0)
        ids = tuple(tokenizer("64", add_special_tokens=False).input_ids) + (tokenizer.eos_token_id,)
        rollout = Rollout("1-0-0", Prompt(0, "12+34=", (1,), "64", 0), "64", ids, (), True, 0)
        refinements, _ = refiner.refine([rollout])
    finally:
        server.shutdown()
    assert refinements[0].refined == "46"
    request = seen[0]
    pinned = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_k": -1, "min_p": 0.0}
    assert {k: request.get(k) for k in pinned} == pinned
    assert (request["temperature"], request["top_p"]) == (config.sampling.temperature, config.sampling.top_p)
