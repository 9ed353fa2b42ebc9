"""Generation served for real: mixed-length prompts, sampling, top-p, the text and token limits, and a long
generation that cannot block the server.

The model is a random tiny Llama with random (non-zero) adapters per task, written as a text bundle and loaded with
``load_service``. Expected answers come from the bundle's files through ``moa.load`` and the model's own
``generate`` / forward on each single, unpadded prompt, never from the service. The server runs in this process
(:func:`moa.pipelines.serving.server.serve_in_thread`: uvicorn on 127.0.0.1, real HTTP) so that a test can hold the long
generation at a decode step of its choosing: the deadline then always passes mid-generation, whatever the speed
of the machine.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from moa.pipelines.bundle import RequestError, load_service
from moa.pipelines.serving.server import Limits, create_app, serve_in_thread
from moa.pipelines.serving.client import post
from moa.pipelines.kinds.causal_lm.service import RowSampling
from moa.pipelines.kinds.classifier.service import ClassifierService
from moa.pipelines.kinds.text_bundle import MAX_TEXT_CHARS, write_text_bundle

TASKS = ["echo", "rev"]
EOS = 102  # MiniLM's [SEP], the presets' eos
BOUND = 60  # seconds: the most any wait of these tests lasts (a safety bound, never reached when all is well)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from moa.pipelines.kinds.causal_lm.module import MoACausalLM

    torch.set_num_threads(1)
    module = MoACausalLM(backbone="tiny-llama", router="static", n_experts=2, r=4, top_k=1,
                         router_options={"key": "task_ids"}, seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: random adapters make each task's routing matter
        for name, parameter in module.model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    module.task_names = TASKS
    return write_text_bundle(tmp_path_factory.mktemp("lm") / "bundle", module)


@pytest.fixture(scope="module")
def reference(bundle):
    """The bundle's model and tokenizer rebuilt from its files with moa's core API."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moa

    model = moa.load(bundle / "adapter", AutoModelForCausalLM.from_pretrained(str(bundle / "base"))).eval()
    return [model, AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))]  # [2]: each token's text (by_text)


def prompt_ids(reference, prompt: str) -> list[int]:
    return reference[1](prompt, add_special_tokens=False)["input_ids"]  # the bundle's template is "{text}"


def alone(reference, prompt: str, task: str, max_new_tokens: int) -> str:
    """Greedy text of one unpadded prompt by the model's own ``generate``, cut at eos."""
    model, tokenizer = reference[:2]
    ids = prompt_ids(reference, prompt)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             task_ids=torch.tensor([TASKS.index(task)]), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=EOS, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    new = new[: new.index(EOS)] if EOS in new else new
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def next_token_logits(reference, prompt: str, task: str) -> torch.Tensor:
    model = reference[0]
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt_ids(reference, prompt)]),
                     task_ids=torch.tensor([TASKS.index(task)])).logits[0, -1].double()


class Served:
    """What ``mlflow.pyfunc.load_model`` returns for a moa bundle, as far as the server looks at it."""

    def __init__(self, service):
        self.service = service

    def unwrap_python_model(self):
        return self


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=BOUND) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------------------------------------- answers
PROMPTS = [("a", "echo"), ("the quick brown fox jumps over the lazy dog", "rev"), ("hello there", "echo"),
           ("one two three four five", "rev")]


def test_mixed_length_prompts_over_http_generate_like_each_prompt_alone(bundle, reference):
    """Prompts of 1 to 9 tokens in one request (left-padded to the longest) answer what each prompt alone does."""
    lengths = {len(prompt_ids(reference, p)) for p, _ in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # every prompt a different length: padding on the wrong side shows
    expected = [alone(reference, p, t, 6) for p, t in PROMPTS]
    assert len(set(expected)) == len(expected) and all(expected)
    with serve_in_thread(create_app(Served(load_service(bundle)))) as url:
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"prompt": p, "task": t} for p, t in PROMPTS],
                                                   "params": {"max_new_tokens": 6}})
    assert status == 200, body
    assert [row["text"] for row in body["predictions"]] == expected


def first_tokens(service, reference, prompt, task, n, temperature, top_p, seeds):
    """The first new token's text of ``n`` rows per seed, sampled by the service."""
    frame = pd.DataFrame({"prompt": [prompt] * n, "task": [task] * n, "temperature": [temperature] * n,
                          "top_p": [top_p] * n, "max_new_tokens": [1.0] * n})
    return [text for seed in seeds for text in service.predict(frame, {"seed": seed})["text"]]


def by_text(reference, probabilities: torch.Tensor) -> dict[str, float]:
    """Probabilities of token ids -> of the texts they decode to (what the service answers)."""
    tokenizer = reference[1]
    if len(reference) == 2:  # each token's text, once
        reference.append([text.strip() for text in tokenizer.batch_decode([[i] for i in range(len(probabilities))],
                                                                           skip_special_tokens=True)])
    out: dict[str, float] = {}
    for text, p in zip(reference[2], probabilities.tolist()):
        out[text] = out.get(text, 0.0) + p
    return out


def assert_follows(samples: list[str], expected: dict[str, float], top: int = 5) -> None:
    """The sample frequencies of the ``top`` likeliest texts and of all others within 4.5 sigma (+0.01)."""
    n = len(samples)
    likeliest = sorted(expected, key=expected.get, reverse=True)[:top]
    for text in [*likeliest, None]:
        p = expected[text] if text is not None else 1 - sum(expected[t] for t in likeliest)
        seen = sum((s == text) if text is not None else (s not in likeliest) for s in samples) / n
        assert abs(seen - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 0.01, (text, seen, p)


def test_sampling_follows_softmax_of_the_logits_over_the_temperature_and_zero_is_greedy(bundle, reference):
    service = load_service(bundle)
    prompt, task, temperature = "hello there", "rev", 0.15
    logits = next_token_logits(reference, prompt, task)
    expected = (logits / temperature).softmax(-1)
    assert 0.2 < float(expected.max()) < 0.8  # a spread distribution: greedy answers would be far off it
    samples = first_tokens(service, reference, prompt, task, 400, temperature, 1.0, seeds=[0, 1, 2])
    assert_follows(samples, by_text(reference, expected))
    # temperature 0: the argmax, every row
    greedy = first_tokens(service, reference, prompt, task, 8, 0.0, 1.0, seeds=[0])
    assert set(greedy) == {reference[1].decode([int(logits.argmax())]).strip()}
    # top_p: only the nucleus HF's TopPLogitsWarper keeps, in its renormalised proportions
    from transformers import TopPLogitsWarper

    kept = TopPLogitsWarper(0.8)(None, (logits / temperature)[None].clone())[0]
    nucleus = kept.softmax(-1)
    assert 1 < int(torch.isfinite(kept).sum()) < 10
    samples = first_tokens(service, reference, prompt, task, 400, temperature, 0.8, seeds=[3, 4, 5])
    allowed = {text for text, p in by_text(reference, nucleus).items() if p > 0}
    assert set(samples) <= allowed
    assert_follows(samples, by_text(reference, nucleus), top=2)


def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_top_p_exactly():
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in floats): top_p 0.75 keeps the first two (their mass is exactly
    0.75), top_p 0.5 the first one, and a hair over 0.75 the first three; as HF's TopPLogitsWarper does."""
    from transformers import TopPLogitsWarper

    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    assert logits.softmax(-1).sort(descending=True).values.cumsum(-1).tolist() == [[0.5, 0.75, 0.875, 1.0]]
    for top_p, keep in [(0.75, {1, 3}), (0.5, {1}), (0.7500001, {1, 3, 0, 2}), (0.74, {1, 3})]:
        ours = RowSampling(torch.tensor([1.0]), torch.tensor([top_p]))(None, logits.clone())[0]
        hf = TopPLogitsWarper(top_p)(None, logits.clone())[0]
        kept = set(torch.isfinite(ours).nonzero().flatten().tolist())
        if top_p == 0.7500001:  # 0.875 >= top_p: the third is needed; either 1/8 token completes the mass
            assert len(kept) == 3 and {1, 3} <= kept and len(kept) == int(torch.isfinite(hf).sum())
        else:
            assert kept == keep == set(torch.isfinite(hf).nonzero().flatten().tolist()), top_p


def test_texts_at_the_length_limit_are_accepted_and_one_character_over_is_refused(bundle):
    from transformers import AutoTokenizer

    from moa.pretrained import minilm_dir
    from moa.pipelines.kinds.classifier.module import MoAClassifier

    module = MoAClassifier(backbone="tiny-bert", backbone_options={"vocab_size": 30522}, n_classes=2, router="static", n_experts=2, r=2,
                           router_options={"key": "task_ids"}).eval()
    meta = {"prompt_template": "{text}", "max_length": 16, "tasks": ["default"], "domains": ["default"],
            "labels": {"default": ["no", "yes"]}, "head": {"type": "shared", "n_classes": 2}}
    classifier = ClassifierService(meta, module.model, AutoTokenizer.from_pretrained(str(minilm_dir())), module.head)
    generator = load_service(bundle)
    at_limit = ("word " * MAX_TEXT_CHARS)[:MAX_TEXT_CHARS - 1] + "x"
    assert len(at_limit) == MAX_TEXT_CHARS
    for service, column, extra in [(classifier, "text", {}), (generator, "prompt", {"task": ["echo"], "max_new_tokens": [1.0]})]:
        if service is classifier:
            assert len(service.predict(pd.DataFrame({column: [at_limit], **extra}))) == 1
        else:  # 20 001 tokens: past the model's context (never cut)
            with pytest.raises(RequestError, match="the prompt is 20001 tokens .* context of 1024"):
                service.predict(pd.DataFrame({column: [at_limit], **extra}))
        with pytest.raises(RequestError, match=f"row 0: {column} of {MAX_TEXT_CHARS + 1} characters is over the "
                                               f"limit of {MAX_TEXT_CHARS}"):
            service.predict(pd.DataFrame({column: [at_limit + "y"], **extra}))


def test_a_prompt_is_never_cut_it_fits_the_context_with_its_new_tokens_or_is_refused(bundle, reference):
    """The tiny Llama's context is 1024 tokens: a prompt of 1016 tokens with 8 new ones reaches the model whole
    (not its last ``max_length`` tokens, as training cuts) and answers what the model's own generate does; one
    more token is refused naming the lengths; max_new_tokens is bounded by the context, not a fixed number."""
    service = load_service(bundle)
    context = reference[0].model.config.max_position_embeddings
    assert context == 1024 and service.meta["max_length"] < context - 8
    prompt = " ".join(["a", "b", "c", "d"] * 254)
    assert len(prompt_ids(reference, prompt)) == context - 8
    widths = []
    service.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    answer = service.predict(pd.DataFrame({"prompt": [prompt], "task": ["rev"], "max_new_tokens": [8.0]}))
    assert widths[0] == context - 8 and answer["text"][0] == alone(reference, prompt, "rev", 8)
    with pytest.raises(RequestError, match="row 0: the prompt is 1017 tokens and max_new_tokens 8: 1025 tokens, "
                                           "more than the model's context of 1024"):
        service.predict(pd.DataFrame({"prompt": [prompt + " e"], "task": ["rev"], "max_new_tokens": [8.0]}))
    frame = pd.DataFrame({"prompt": ["a"], "task": ["rev"]})
    assert service.generated_tokens(frame, {"max_new_tokens": context}) == context
    with pytest.raises(RequestError, match=r"max_new_tokens must be an integer in \[1, 1024\]"):
        service.generated_tokens(frame, {"max_new_tokens": context + 1})


# ---------------------------------------------------------------------------------------------- the server
def test_a_request_over_the_token_limit_gets_413_naming_tokens(bundle):
    limits = Limits(max_generated_tokens=12)
    rows = [{"prompt": "hello", "task": "echo"}] * 3
    with serve_in_thread(create_app(Served(load_service(bundle)), limits)) as url:
        status, body = post(f"{url}/invocations", {"dataframe_records": rows, "params": {"max_new_tokens": 4}})
        assert status == 200 and len(body["predictions"]) == 3, body  # 3 x 4 = 12: at the limit
        over = [*rows[:2], {**rows[2], "max_new_tokens": 5}]  # 4 + 4 + 5
        status, body = post(f"{url}/invocations", {"dataframe_records": over, "params": {"max_new_tokens": 4}})
        assert status == 413 and body["error_code"] == "REQUEST_TOO_LARGE", body
        assert "13 new tokens" in body["message"] and "limit of 12 new tokens" in body["message"]
        assert "max_new_tokens" in body["message"]
        status, body = post(f"{url}/invocations", {"dataframe_records": rows, "params": {"max_new_tokens": 0}})
        assert status == 400 and "max_new_tokens must be an integer" in body["message"], body


def held_service(bundle, rows: int, at: int):
    """The bundle's service, with the forward calls of ``rows``-row batches counted and the ``at``-th held until
    ``release`` is set (before the service takes the model: the held request does not hold it)."""
    service = load_service(bundle)
    calls, reached, release = [], threading.Event(), threading.Event()

    def hold(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] == rows:
            calls.append(ids.shape[1])
            if len(calls) == at:
                reached.set()
                release.wait(BOUND)

    service.model.model.register_forward_pre_hook(hold, prepend=True, with_kwargs=True)
    return service, calls, reached, release


def post_in_thread(url: str, body: dict, answers: dict, name: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.update({name: post(f"{url}/invocations", body, BOUND)}))
    thread.start()
    return thread


def wait_for_hold(reached: threading.Event, answers: dict, name: str) -> None:
    give_up = time.monotonic() + BOUND
    while not reached.wait(0.01):
        assert name not in answers, f"{name} answered before it was held: {answers[name]}"
        assert time.monotonic() < give_up, f"{name} was never held"


def test_concurrent_generations_each_keep_their_own_routing(bundle, reference):
    """A 3-row generation held at its 3rd forward call while a 1-row one (another task) runs to its end, then let
    go: both answer what each prompt alone does (each decode step runs with its own request's routing)."""
    service, calls, reached, release = held_service(bundle, rows=3, at=3)
    rows = [{"prompt": p, "task": "echo"} for p, _ in PROMPTS[:3]]
    with serve_in_thread(create_app(Served(service), Limits(timeout=BOUND))) as url:
        answers = {}
        long = post_in_thread(url, {"dataframe_records": rows, "params": {"max_new_tokens": 6}}, answers, "long")
        try:
            wait_for_hold(reached, answers, "long")
            status, body = post(f"{url}/invocations", {"dataframe_records": [{"prompt": "hello there", "task": "rev"}],
                                                       "params": {"max_new_tokens": 6}}, BOUND)
        finally:
            release.set()
            long.join(BOUND)
    assert status == 200 and body["predictions"][0]["text"] == alone(reference, "hello there", "rev", 6), body
    status, body = answers["long"]
    assert status == 200 and [p["text"] for p in body["predictions"]] == [alone(reference, r["prompt"], "echo", 6)
                                                                          for r in rows], body


def test_a_long_generation_times_out_at_its_deadline_stops_and_does_not_block_a_short_one(bundle, reference):
    """The long request (3 rows, 64 new tokens) is held at its 4th forward call until the test lets it go, so its
    deadline passes mid-generation: meanwhile a one-row request is answered, then the long one gets its 503, and
    once let go it stops at the next decode step instead of running on to 64 tokens."""
    long_rows, hold_at = 3, 4
    service, calls, reached, release = held_service(bundle, long_rows, hold_at)
    limits = Limits(timeout=2.0)
    with serve_in_thread(create_app(Served(service), limits)) as url:
        answers = {}
        long_body = {"dataframe_records": [{"prompt": p, "task": t} for p, t in PROMPTS[:long_rows]],
                     "params": {"max_new_tokens": 64}}
        started = time.monotonic()
        long = post_in_thread(url, long_body, answers, "long")
        try:
            wait_for_hold(reached, answers, "long")
            status, body = post(f"{url}/invocations", {"dataframe_records": [{"prompt": "hello there", "task": "rev"}],
                                                       "params": {"max_new_tokens": 4}}, BOUND)
            assert status == 200, body  # answered while the long one is held (it cannot have finished)
            assert body["predictions"][0]["text"] == alone(reference, "hello there", "rev", 4)
            assert "long" not in answers
            long.join(BOUND)
            status, body = answers["long"]
            assert status == 503 and body["error_code"] == "TIMEOUT", body
            assert limits.timeout <= time.monotonic() - started < limits.timeout + 5
            assert "max_new_tokens" in body["message"]
            assert len(calls) == hold_at  # still held: nothing ran past the hold
        finally:
            release.set()
            long.join(BOUND)
        give_up = time.monotonic() + BOUND
        while (now := health(url))["scoring"] or not now["stopped"]:  # the worker has left the generation
            assert time.monotonic() < give_up, f"the timed-out generation did not stop: {now}"
        assert len(calls) == hold_at, calls  # the held step was its last: stopped at the next decode step
        assert now["stopped"] == 1 and now["timed_out"] == 1
