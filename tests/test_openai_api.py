"""The OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``) through the official
``openai`` client against a real server on 127.0.0.1 (uvicorn in a thread of this process:
:func:`moa.pipelines.serving.server.serve_in_thread`).

The model is a random tiny Llama with random (non-zero) adapters per task and a ChatML chat template on its
tokenizer, written as a text bundle. Expected answers come from the bundle's files through ``moa.load``, the
model's own ``generate`` on each unpadded prompt and the tokenizer, never from the server's code. One test serves
the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from moa.pipelines.bundle import load_service
from moa.pipelines.kinds.text_bundle import write_text_bundle
from moa.pipelines.serving.server import Limits, create_app, serve_in_thread

openai = pytest.importorskip("openai")

TASKS = ["echo", "rev"]
EOS = 102  # MiniLM's [SEP], the presets' eos
NAME = "tiny-pool"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "you answer briefly"}, {"role": "user", "content": "what is the capital?"}]


class Served:
    """What ``mlflow.pyfunc.load_model`` returns for a moa bundle, as far as the server looks at it."""

    def __init__(self, service):
        self.service = service

    def unwrap_python_model(self):
        return self


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, one_thread) -> Path:
    from transformers import AutoTokenizer

    from moa.pipelines.kinds.causal_lm.module import MoACausalLM
    from moa.pretrained import minilm_dir

    module = MoACausalLM(backbone="tiny-llama", router="static", n_experts=2, r=4, top_k=1,
                         router_options={"key": "task_ids"}, seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: random adapters make each task's routing matter
        for parameter in module.model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    module.task_names = TASKS
    module.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    module.tokenizer.chat_template = CHATML
    return write_text_bundle(tmp_path_factory.mktemp("lm") / "bundle", module)


@pytest.fixture(scope="module")
def reference(bundle):
    """The bundle's model and tokenizer rebuilt from its files with moa's core API."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moa

    model = moa.load(bundle / "adapter", AutoModelForCausalLM.from_pretrained(str(bundle / "base"))).eval()
    return model, AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))


@pytest.fixture(scope="module")
def client(bundle):
    with serve_in_thread(create_app(Served(load_service(bundle)), Limits(timeout=60), model_name=NAME)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def tokens(reference, prompt: str) -> list[int]:
    return reference[1](prompt, add_special_tokens=False)["input_ids"]  # the bundle's template is "{text}"


def chat_text(reference, messages) -> str:
    return reference[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def alone(reference, prompt: str, task: str | None, max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy text of one unpadded prompt by the model's own ``generate`` (task None: the base alone), cut at
    eos, and the new tokens up to the eos included."""
    model, tokenizer = reference
    ids = tokens(reference, prompt)
    with torch.no_grad():
        options = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=EOS, pad_token_id=0)
        if task is None:
            with model.disable_adapters():
                out = model.model.generate(**options)
        else:
            out = model.generate(**options, task_ids=torch.tensor([TASKS.index(task)]))
    new = out[0, len(ids):].tolist()
    new = new[: new.index(EOS) + 1] if EOS in new else new
    return tokenizer.decode([t for t in new if t != EOS], skip_special_tokens=True).strip(), new


def raw_post(client, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{client.base_url}{path}".replace("/v1//", "/v1/"), json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ------------------------------------------------------------------------------------------------ answers
def test_completions_answer_what_the_model_generates_with_finish_reason_and_usage(client, reference):
    prompts = ["hello there", "the quick brown fox jumps over the lazy dog"]
    answer = client.completions.create(model="rev", prompt=prompts, max_tokens=6, temperature=0)
    assert answer.object == "text_completion" and answer.model == "rev" and len(answer.choices) == 2
    completion_tokens = 0
    for choice, prompt in zip(answer.choices, prompts):
        text, new = alone(reference, prompt, "rev", 6)
        assert choice.text == text and choice.finish_reason == ("stop" if EOS in new else "length")
        completion_tokens += len(new)
    prompt_tokens = sum(len(tokens(reference, p)) for p in prompts)
    assert answer.usage.prompt_tokens == prompt_tokens and answer.usage.completion_tokens == completion_tokens
    assert answer.usage.total_tokens == prompt_tokens + completion_tokens


def test_chat_applies_the_chat_template_and_each_model_name_routes(client, reference):
    prompt = chat_text(reference, CHAT)
    assert prompt.endswith("<|im_start|>assistant\n")
    texts = {}
    for model, task in [("echo", "echo"), ("rev", "rev"), ("base", None)]:
        answer = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
        text, new = alone(reference, prompt, task, 8)
        assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == texts.setdefault(model, text)
        assert answer.usage.prompt_tokens == len(tokens(reference, prompt))
        assert answer.usage.completion_tokens == len(new)
    assert len(set(texts.values())) == 3  # each adapter (or none) answers differently
    # the served name routes by the request's task (an extension field); model left out names it too
    routed = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=0,
                                            extra_body={"task": "rev", "some_unknown_field": 1})
    assert routed.choices[0].message.content == texts["rev"]
    status, body = raw_post(client, "/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 0,
                                                           "task": "echo"})
    assert status == 200 and body["choices"][0]["message"]["content"] == texts["echo"] and body["model"] == NAME
    assert [m.id for m in client.models.list().data] == [NAME, *TASKS, "base"]


def test_streamed_chunks_concatenate_to_the_text_and_end_with_finish_reason_and_usage(client, reference):
    for kind in ("completions", "chat"):
        create = client.completions.create if kind == "completions" else client.chat.completions.create
        request = dict(prompt="one two three") if kind == "completions" else dict(messages=CHAT)
        whole = create(model="echo", max_tokens=24, temperature=0, **request)
        chunks = list(create(model="echo", max_tokens=24, temperature=0, stream=True,
                             stream_options={"include_usage": True}, **request))
        if kind == "completions":
            pieces, text = [c.choices[0].text for c in chunks if c.choices], whole.choices[0].text
        else:
            assert chunks[0].choices[0].delta.role == "assistant"
            pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            text = whole.choices[0].message.content
        assert len([p for p in pieces if p]) > 3 and "".join(pieces) == text  # streamed in many pieces
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_strings_end_the_text_before_them_and_the_stream_never_shows_them(client, reference):
    prompt = "one two three"
    full, new = alone(reference, prompt, "echo", 24)
    words = full.split()
    assert len(words) > 4
    stop = f"{words[2][-1]} {words[3]}"  # starts inside a token: the stream must hold that character back
    cut = full[:full.find(stop)].rstrip()
    # independently: the tokens up to the first whose text completes the stop string
    needed = next(n for n in range(1, len(new) + 1) if stop in reference[1].decode(new[:n], skip_special_tokens=True))
    answer = client.completions.create(model="echo", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert answer.choices[0].text == cut and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == needed < 24
    chunks = client.completions.create(model="echo", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_a_seed_repeats_sampling_streamed_or_not_and_another_seed_differs(client):
    ask = dict(model="rev", prompt="hello there", max_tokens=12, temperature=1.0, top_p=0.95)
    texts = [client.completions.create(seed=seed, **ask).choices[0].text for seed in (7, 7, 8)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(seed=7, stream=True, **ask))
    assert texts[0] == texts[1] == streamed and texts[2] != texts[0]
    extended = client.completions.create(seed=7, extra_body={"top_k": 3, "repetition_penalty": 1.3}, **ask)
    assert extended.choices[0].text != texts[0]  # the extensions reach the sampler


def test_a_text_stream_never_hands_out_what_a_later_token_changes():
    """Decodings of a growing text: a token that changes the one before it, an unfinished character, trailing
    whitespace, a stop string over three tokens; the pieces add up to the final text and none is taken back."""
    from moa.pipelines.kinds.causal_lm.service import TextStream

    steps = ["It", "It '", "It's", "It's a caf\ufffd", "It's a café", "It's a café E", "It's a café EN"]
    stream = TextStream(["END"])  # the next step, "It's a café END", ends the row
    pieces = [stream.step(raw) for raw in steps]
    pieces.append(stream.finish("It's a café"))
    assert "".join(pieces) == "It's a café" and pieces[1] == "It"


# ------------------------------------------------------------------------------------------------ refusals
def test_an_unknown_model_is_404_and_bad_values_400_in_openai_error_shape(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"
    assert "nope" in error.value.body["message"] and "echo" in error.value.body["message"]
    for field, value in [("temperature", 3), ("n", 2), ("max_tokens", 0), ("top_p", 0), ("logprobs", 2),
                         ("presence_penalty", 0.5), ("stop", [""]), ("seed", "x")]:
        status, body = raw_post(client, "/completions", {"model": "echo", "prompt": "hi", field: value})
        assert status == 400 and set(body) == {"error"}, (field, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == field
        assert body["error"]["type"] == "invalid_request_error"
    status, body = raw_post(client, "/chat/completions", {"model": NAME, "messages": CHAT})
    assert status == 400 and "task" in body["error"]["message"] and body["error"]["param"] == "model"


def test_a_prompt_past_the_context_is_refused_naming_the_lengths_never_cut(client, reference):
    prompt = " ".join(["a", "b", "c", "d"] * 254)  # 1016 tokens; the tiny Llama's context is 1024
    assert len(tokens(reference, prompt)) == 1016
    answer = client.completions.create(model="echo", prompt=prompt, max_tokens=8, temperature=0)
    assert answer.usage.prompt_tokens == 1016 and answer.choices[0].text == alone(reference, prompt, "echo", 8)[0]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="echo", prompt=prompt, max_tokens=9)
    body = error.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "prompt"
    assert "1016 tokens and max_new_tokens 9: 1025 tokens, more than the model's context of 1024" in body["message"]
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be an integer in \[1, 1024\]"):
        client.completions.create(model="echo", prompt="a", max_tokens=1025)


def test_moa_serve_checks_the_port_before_loading_anything(tmp_path, monkeypatch):
    from moa.experts.errors import UserError
    from moa.pipelines.serving.serve_command import serve_main

    monkeypatch.chdir(tmp_path)  # whatever it would read or write otherwise stays here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is taken"):
            serve_main(["--model-uri", "models:/no-such-model/1", "--port", str(port)])
        assert time.monotonic() - started < 5


# ------------------------------------------------------------------------------------------------ a real LLM
def test_served_smollm2_answers_the_capital_of_france(smollm2_dir, tmp_path, one_thread):
    """SmolLM2-135M-Instruct with two experts on its top layer (random, zero-initialised B: the base's answers),
    written as a bundle, served, and asked in chat through the openai client."""
    from moa.pipelines.kinds.causal_lm.module import MoACausalLM

    module = MoACausalLM(backbone=str(smollm2_dir), router="static", n_experts=2, r=4, top_k=1,
                         target_modules=r".*layers\.29\.self_attn\.(q|v)_proj", router_options={"key": "task_ids"})
    module.task_names = ["geo", "chat"]
    bundle = write_text_bundle(tmp_path / "smollm2", module.eval())
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with serve_in_thread(create_app(Served(load_service(bundle)), model_name="smollm2-pool")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="geo", messages=question, max_tokens=12, temperature=0)
    assert "Paris" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop", answer
    ids = module.tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad(), module.model.disable_adapters():  # transformers' greedy generate of the base (the experts
        out = module.model.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)  # are 0)
    new = out[0, len(ids):].tolist()
    assert new[-1] == 2 and answer.choices[0].message.content == module.tokenizer.decode(new[:-1]).strip()
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == len(new)  # <|im_end|> too
