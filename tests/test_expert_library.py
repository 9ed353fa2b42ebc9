"""The expert library: PEFT LoRA adapters from separate "runs" registered as experts in a real MLflow store, pools
assembled from registry URIs and served as causal-LM bundles; answers checked against PEFT generating with each
adapter alone."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from moa.pipelines.bundle import load_service
from moa.pipelines.tracking.expert_library import register_expert, resolve_experts, write_pool_bundle

PROMPTS = ["say cat", "say dog", "say sun"]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moa.pipelines.kinds.causal_lm.module import save_preset

    root = tmp_path_factory.mktemp("library")
    base = save_preset("tiny-llama", root / "base")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    adapters = {}
    for seed, name in enumerate(["echo", "reverse", "shout"]):  # three runs, each its own adapter
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        model.save_pretrained(str(root / name))
        adapters[name] = root / name
    yield {"root": root, "base": base, "uri": uri, "adapters": adapters}
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def peft_generations(base: Path, adapter: Path | None, prompts, service, max_new_tokens: int):
    """Greedy generation with PEFT and one adapter (``None``: the base alone), decoded as the service decodes (cut
    at eos)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return greedy_texts(model, prompts, service, max_new_tokens)


def greedy_texts(model, prompts, service, max_new_tokens: int):
    """``model``'s greedy generation of each prompt alone, decoded as the service decodes (cut at eos)."""
    eos, pad = service.meta["eos_token_id"], service.meta["pad_token_id"]
    texts = []
    for prompt in prompts:
        ids = torch.tensor([service.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: next((j for j, i in enumerate(new) if i == eos), len(new))]
        texts.append(service.tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts


def test_a_pool_from_registry_uris_serves_each_expert_like_peft_and_adding_one_retrains_none(library, tmp_path):
    versions = {name: register_expert(folder, name) for name, folder in library["adapters"].items()}
    from mlflow import MlflowClient

    stored = [MlflowClient().get_model_version(name, v.version) for name, v in versions.items()]
    assert all(str(v.version) == "1" and v.tags["moa.kind"] == "expert" for v in stored), stored
    first = write_pool_bundle(tmp_path / "pool-1", library["base"], ["models:/echo/1", "models:/reverse/1"])
    meta = json.loads((first / "service.json").read_text())
    assert meta["tasks"] == ["echo", "reverse", "base"]  # "base": the base alone
    assert meta["experts"] == [{"name": "echo", "uri": "models:/echo/1", "version": "1"},
                               {"name": "reverse", "uri": "models:/reverse/1", "version": "1"}]
    # the base is referenced (its folder and the sha256 of its config), not copied
    assert not (first / "base").exists()
    assert meta["base_reference"] == str(library["base"].resolve())
    assert meta["base_sha256"] == hashlib.sha256((library["base"] / "config.json").read_bytes()).hexdigest()
    assert sum(f.stat().st_size for f in first.rglob("*") if f.is_file()) < (library["base"] / "model.safetensors").stat().st_size

    service = load_service(first)
    tasks = ["echo"] * 3 + ["reverse"] * 3 + ["base"] * 3
    rows = pd.DataFrame({"prompt": PROMPTS * 3, "task": tasks}).sample(frac=1, random_state=0)
    answer = service.predict(rows.reset_index(drop=True), {"max_new_tokens": 5})
    for name in ("echo", "reverse", "base"):
        adapter = library["adapters"].get(name)  # base rows: the base model alone, no adapter
        expected = peft_generations(library["base"], adapter, PROMPTS, service, 5)
        got = dict(zip(answer["text"][rows["task"].to_numpy() == name],
                       rows["prompt"][rows["task"] == name]))
        assert {p: t for t, p in got.items()} == dict(zip(PROMPTS, expected)), name
    assert len(set(answer["text"])) > 2  # the experts and the base differ

    # a third expert, from another run: the pool is assembled again, nothing is retrained
    second = write_pool_bundle(tmp_path / "pool-2", library["base"],
                               ["models:/echo/1", "models:/reverse/1", "models:/shout/1"])
    old, new = load_file(str(first / "adapter" / "moa_model.safetensors")), load_file(str(second / "adapter" / "moa_model.safetensors"))
    # experts stacked along the rank: A [E * r, in], B [out, E * r] (E: the experts and the base's zero expert);
    # the first two experts' blocks are unchanged
    a_keys, b_keys = [k for k in old if k.endswith("lora_A")], [k for k in old if k.endswith("lora_B")]
    assert a_keys and len(a_keys) == len(b_keys) and all(new[k].shape[0] == old[k].shape[0] * 4 // 3 for k in a_keys)
    two = old[a_keys[0]].shape[0] * 2 // 3
    assert all(torch.equal(old[k][:two], new[k][:two]) for k in a_keys)
    assert all(torch.equal(old[k][:, :two], new[k][:, :two]) for k in b_keys)
    shout = load_service(second).predict(pd.DataFrame({"prompt": PROMPTS, "task": ["shout"] * 3}), {"max_new_tokens": 5})
    assert list(shout["text"]) == peft_generations(library["base"], library["adapters"]["shout"], PROMPTS, service, 5)


def test_a_new_version_and_an_alias_resolve_and_bad_uris_are_refused(library, tmp_path):
    from mlflow import MlflowClient

    register_expert(library["adapters"]["echo"], "echo-lib")
    assert str(MlflowClient().get_model_version_by_alias("echo-lib", "champion").version) == "1"
    register_expert(library["adapters"]["shout"], "echo-lib")  # a retrained expert: version 2, the champion
    assert {k: str(v) for k, v in MlflowClient().get_registered_model("echo-lib").aliases.items()} == {"champion": "2"}
    experts = resolve_experts(["models:/echo-lib@champion", "models:/echo-lib/1"], directory=tmp_path)
    assert [(e["name"], e["version"]) for e in experts] == [("echo-lib-v2", "2"), ("echo-lib-v1", "1")]
    for uri, message in (("models:/nosuch/1", r"no registered model 'nosuch' .*registered: .*echo-lib"),
                         ("models:/echo-lib/7", r"model 'echo-lib' has no version 7 \(its versions: \[1, 2\]\)"),
                         ("models:/echo-lib@gold", r"model 'echo-lib' has no alias @gold \(its aliases: @champion -> v2")):
        with pytest.raises(ValueError, match=message) as error:
            resolve_experts([uri], directory=tmp_path / "missing")
        assert uri in str(error.value) and "\n" not in str(error.value)
    assert (experts[0]["folder"] / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match="write models:/<name>/<version>"):
        resolve_experts(["runs:/abc/adapter"])
    with pytest.raises(ValueError, match="given twice"):
        resolve_experts(["models:/echo-lib/1", "models:/echo-lib/1"], directory=tmp_path / "twice")
    with pytest.raises(ValueError, match="at least one expert"):
        resolve_experts([])


def test_a_folder_that_is_not_a_lora_adapter_registers_nothing(library, tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        register_expert(tmp_path / "empty", "never")
    assert MlflowClient().search_model_versions("name='never'") == []


def test_expert_commands_register_and_pool_from_the_cli(library, tmp_path, capsys):
    moa = str(Path(sys.executable).with_name("moa"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": library["uri"]}
    done = subprocess.run([moa, "expert", "register", "--adapter", str(library["adapters"]["reverse"]), "--name", "cli-rev"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # the real CLI
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["version"] == "1"
    assert json.loads(done.stdout.strip().splitlines()[-1])["alias"] == "champion"
    from moa.pipelines.cli.command import main  # the rest through the command's entry point, in process

    assert main(["expert", "pool", "--base", str(library["base"]), "--expert", "models:/cli-rev/1", "--out",
                 str(tmp_path / "pool"), "--register-as", "cli-pool", "--tracking-uri", library["uri"]]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["version"] == "1"
    import mlflow

    mlflow.set_tracking_uri(library["uri"])
    model = mlflow.pyfunc.load_model("models:/cli-pool/1")
    assert model.metadata.metadata["tasks"] == ["cli-rev", "base"]
    answer = model.predict(pd.DataFrame({"prompt": ["say cat"], "task": ["cli-rev"]}), params={"max_new_tokens": 3})
    expected = peft_generations(library["base"], library["adapters"]["reverse"], ["say cat"],
                                load_service(tmp_path / "pool"), 3)  # PEFT with the registered adapter alone
    assert list(answer["text"]) == expected
    assert main(["expert", "pool", "--base", str(tmp_path / "nope"), "--expert", "models:/cli-rev/1",
                 "--out", str(tmp_path / "bad"), "--tracking-uri", library["uri"]]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "nope") in error.strip().splitlines()[-1] and "Traceback" not in error
    assert not (tmp_path / "bad").exists()


def test_a_pool_on_a_base_the_experts_do_not_fit_names_both_bases(library, tmp_path):
    from moa.experts.errors import UserError
    from moa.pipelines.kinds.causal_lm.module import save_preset

    register_expert(library["adapters"]["echo"], "echo-fit")
    gpt2 = save_preset("tiny-gpt2", tmp_path / "gpt2")  # no q_proj / v_proj: not the experts' base
    with pytest.raises(UserError) as error:
        write_pool_bundle(tmp_path / "pool", gpt2, ["models:/echo-fit/1"])
    message = str(error.value)
    assert repr(str(library["base"])) in message and repr(str(gpt2)) in message, message  # recorded and given
    assert "q_proj" in message and not (tmp_path / "pool").exists()


class Served:
    """What ``mlflow.pyfunc.load_model`` returns for a moa bundle, as far as the server looks at it."""

    def __init__(self, service):
        self.service = service

    def unwrap_python_model(self):
        return self


def test_an_arrow_pool_served_over_http_answers_rows_without_a_task_like_from_peft(library, tmp_path):
    from transformers import AutoModelForCausalLM

    import moa
    from moa.pipelines.serving.client import post
    from moa.pipelines.serving.server import create_app, serve_in_thread

    names = ["echo", "reverse", "shout"]
    for name in names:
        register_expert(library["adapters"][name], f"arrow-{name}")
    bundle = write_pool_bundle(tmp_path / "arrow", library["base"], [f"models:/arrow-{n}/1" for n in names],
                               router="arrow", top_k=2, temperature=0.5)
    meta = json.loads((bundle / "service.json").read_text())
    assert meta["tasks"] == ["default"] and meta["routing"] == "arrow"  # no task to name, no "base" task
    service = load_service(bundle)
    reference = moa.from_peft(AutoModelForCausalLM.from_pretrained(str(library["base"])),
                              {f"arrow-{n}": library["adapters"][n] for n in names}, router="arrow", top_k=2,
                              router_options={"temperature": 0.5}).eval()
    expected = greedy_texts(reference, PROMPTS, service, 5)
    assert expected != peft_generations(library["base"], None, PROMPTS, service, 5)  # the experts count
    with serve_in_thread(create_app(Served(service))) as url:
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"prompt": p} for p in PROMPTS],
                                                   "params": {"max_new_tokens": 5}})
        assert status == 200, body
        assert [row["text"] for row in body["predictions"]] == expected
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"prompt": "say cat", "task": "base"}]})
        assert status == 400 and "unknown task 'base'" in body["message"]


def test_a_uniform_pool_equals_peft_s_equal_weighted_merge(library, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = ["echo", "reverse", "shout"]
    for name in names:
        register_expert(library["adapters"][name], f"uniform-{name}")
    bundle = write_pool_bundle(tmp_path / "uniform", library["base"], [f"models:/uniform-{n}/1" for n in names],
                               router="uniform")
    service = load_service(bundle)
    answer = service.predict(pd.DataFrame({"prompt": PROMPTS}), {"max_new_tokens": 5})
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(library["base"])),
                                      str(library["adapters"]["echo"]), adapter_name="echo")
    for name in names[1:]:
        model.load_adapter(str(library["adapters"][name]), adapter_name=name)
    model.add_weighted_adapter(names, [1 / 3] * 3, "mean", combination_type="cat")  # sum_e B_e A_e / 3, exactly
    model.set_adapter("mean")
    assert list(answer["text"]) == greedy_texts(model.eval(), PROMPTS, service, 5)


def test_a_learned_router_trains_only_its_gate_over_the_frozen_experts_toward_the_rows_expert(library, tmp_path):
    """``--router learned``: a top-2 gate over two frozen experts, trained on rows whose targets are what expert
    ``echo`` answers, moves its weight toward ``echo`` (about 1/2 each before); the experts' factors are those of
    the registered adapters bit for bit; the served pool answers rows naming no task."""
    from transformers import AutoModelForCausalLM

    import moa

    for name in ("echo", "reverse"):
        register_expert(library["adapters"][name], f"learned-{name}")
    uris = ["models:/learned-echo/1", "models:/learned-reverse/1"]
    task_pool = load_service(write_pool_bundle(tmp_path / "task", library["base"], uris))
    targets = peft_generations(library["base"], library["adapters"]["echo"], PROMPTS, task_pool, 4)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": p, "target": t}) + "\n" for p, t in zip(PROMPTS * 8, targets * 8)))
    bundle = write_pool_bundle(tmp_path / "learned", library["base"], uris, router="learned", router_data=rows,
                               router_steps=20, router_lr=0.05)
    meta = json.loads((bundle / "service.json").read_text())
    assert meta["tasks"] == ["default"] and meta["routing"] == "learned"
    assert meta["router_training"]["last_loss"] < meta["router_training"]["first_loss"]

    untrained = moa.from_peft(AutoModelForCausalLM.from_pretrained(str(library["base"])),
                              {n: library["adapters"][n] for n in ("echo", "reverse")}, router="topk", top_k=2).eval()
    service = load_service(bundle)
    trained = service.model

    def echo_weight(model) -> float:  # the mean gate weight of expert 0 (echo) over the layers, on the prompts
        ids = service.tokenizer(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**ids)
        usage = [m.last_usage[0] for m in model.modules() if isinstance(m, moa.MoALinear)]
        return float(torch.stack(usage).mean())

    assert abs(echo_weight(untrained) - 0.5) < 0.05 and echo_weight(trained) > 0.6
    ours = {k: v for k, v in trained.state_dict().items() if ".pool." in k}
    theirs = untrained.state_dict()
    assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())  # the experts did not train
    answer = service.predict(pd.DataFrame({"prompt": PROMPTS}), {"max_new_tokens": 4})
    assert len(answer["text"]) == len(PROMPTS)


def test_an_arrow_pool_assembled_again_with_one_more_expert_computes_only_its_prototypes(library, tmp_path,
                                                                                         monkeypatch):
    from collections import OrderedDict

    from moa.routers import arrow

    monkeypatch.setattr(arrow, "_cache", OrderedDict())  # nothing seen before
    calls, svd = [], arrow.top_right_singular_vector
    monkeypatch.setattr(arrow, "top_right_singular_vector", lambda a, b: calls.append(1) or svd(a, b))
    for name in ("echo", "reverse", "shout"):
        register_expert(library["adapters"][name], f"grow-{name}")
    uris = ["models:/grow-echo/1", "models:/grow-reverse/1", "models:/grow-shout/1"]
    rows = pd.DataFrame({"prompt": PROMPTS[:1]})
    load_service(write_pool_bundle(tmp_path / "two", library["base"], uris[:2], router="arrow")).predict(rows)
    layers = 2 * 2  # tiny-llama: 2 layers, q_proj and v_proj
    assert len(calls) == 2 * layers
    load_service(write_pool_bundle(tmp_path / "three", library["base"], uris, router="arrow")).predict(rows)
    assert len(calls) == 3 * layers
    meta = json.loads((tmp_path / "three" / "adapter" / "moa_config.json").read_text())["config"]
    assert (meta["router"], meta["top_k"], meta["router_options"]) == ("arrow", 3, {"temperature": 1.0})  # defaults


def test_routing_choices_are_checked_before_anything_is_written(library, tmp_path, capsys):
    from moa.pipelines.cli.command import main

    register_expert(library["adapters"]["echo"], "choice-echo")
    uri = "models:/choice-echo/1"
    for extra, message in ((["--router", "arrow", "--top-k", "2"], "between 1 and the pool's 1 experts"),
                           (["--top-k", "1"], "this pool's --router is 'task'"),
                           (["--router", "arrow", "--temperature", "0"], "must be a positive number")):
        assert main(["expert", "pool", "--base", str(library["base"]), "--expert", uri, "--out", str(tmp_path / "bad"),
                     "--tracking-uri", library["uri"], *extra]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert message in error[-1] and "Traceback" not in "\n".join(error), error
        assert not (tmp_path / "bad").exists()


def test_general_adapters_are_subtracted_from_every_expert_gen_know_sub(library, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import moa
    from moa.pipelines.cli.command import main
    from moa.pipelines.tracking.expert_library import gen_know_sub

    for name in ("echo", "reverse", "shout"):
        register_expert(library["adapters"][name], f"gks-{name}")
    assert main(["expert", "pool", "--base", str(library["base"]), "--expert", "models:/gks-echo/1", "--expert",
                 "models:/gks-reverse/1", "--general", "models:/gks-shout/1", "--router", "arrow", "--out",
                 str(tmp_path / "pool"), "--tracking-uri", library["uri"]]) == 0
    service = load_service(tmp_path / "pool")
    assert service.meta["general"] == [{"name": "gks-shout", "uri": "models:/gks-shout/1", "version": "1"}]
    purified = gen_know_sub({n: library["adapters"][n] for n in ("echo", "reverse")}, [library["adapters"]["shout"]],
                            tmp_path / "gks")
    reference = moa.from_peft(AutoModelForCausalLM.from_pretrained(str(library["base"])), purified, router="arrow",
                              top_k=2).eval()
    plain = moa.from_peft(AutoModelForCausalLM.from_pretrained(str(library["base"])),
                          {n: library["adapters"][n] for n in ("echo", "reverse")}, router="arrow", top_k=2).eval()
    expected = greedy_texts(reference, PROMPTS, service, 5)
    assert expected != greedy_texts(plain, PROMPTS, service, 5)
    assert list(service.predict(pd.DataFrame({"prompt": PROMPTS}), {"max_new_tokens": 5})["text"]) == expected
