"""An expert library in the MLflow registry: each expert (one PEFT LoRA adapter) is a registered model version of
its own, and a served pool is assembled from registry URIs (S-LoRA style): experts trained in different runs,
combined without retraining any of them.

    moa expert register --adapter runs/echo-lora --name echo     # a new version of the expert 'echo', its @champion
    moa expert pool --base smollm2-135m --expert models:/echo/1 --expert models:/reverse@champion \\
        --out pool-bundle [--register-as my-pool] [--include-base] [--router {task,arrow,uniform}]

An expert has no validation metric to gate it: each registered version takes the alias ``@champion`` (the newest
registered expert is the one pools take by alias; earlier versions stay addressable by number).

A pool is a causal-LM bundle (:mod:`moa.pipelines.kinds.text_bundle`) whose tasks are the experts: a request row
``{"prompt": ..., "task": "echo"}`` is answered by the base with expert ``echo`` (static routing on ``task_ids``,
rows of different experts in one batch through the grouped kernels), and a row ``{"task": "base"}``
(:data:`BASE_TASK`) by the base alone. ``service.json`` records which registry version each expert came from.
With ``--router arrow`` the experts are composed token by token, training-free (:mod:`moa.routers.arrow`), and
with ``--router uniform`` mixed equally: such a pool reads no task (rows name none) and has no ``base`` task;
``--general URI`` subtracts general adapters' mean from every expert first (GenKnowSub). The pool references its
base (a pretrained name, a GGUF file or a folder, checked by checksum at load) and holds one copy of it only with
``--include-base``. Adding an expert is assembling again with one more URI: the other experts' weights are copied,
not retrained (tested bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from moa.experts.errors import UserError
import moa
from moa.pipelines.tracking.registry import CHAMPION, registered_version

EXPERIMENT = "moa-experts"
KIND_TAG = "moa.kind"
BASE_TASK = "base"  # the pool's task (request rows' "task") answered by the base alone, without an expert
# how a pool chooses experts: the row's task (one expert per task), Arrow (token-wise, training-free), equal mixture,
# a top-k gate trained over the frozen experts (MoLE / X-LoRA style: only the gates train)
ROUTINGS = ("task", "arrow", "uniform", "learned")


def register_expert(adapter: str | Path, name: str, *, tracking_uri: str | None = None):
    """Log a PEFT LoRA adapter folder to a run of the ``moa-experts`` experiment and register it as a new version
    of ``name`` (tagged ``moa.kind=expert``, with its rank, targets and base) and move ``@champion`` to it (an
    expert has no metric to gate on: the newest is the champion); returns the model version. The folder is
    checked first (a LoRA adapter moa can import): a bad one registers nothing."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from moa.peft_bridge import _read_adapter

    from moa.pipelines.tracking.store import resolve_tracking_uri

    folder = Path(adapter)
    config, factors = _read_adapter(folder)  # raises naming the folder and the problem
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    mlflow.set_experiment(EXPERIMENT)
    client = MlflowClient()
    tags = {KIND_TAG: "expert", "r": str(next(iter(factors.values()))[0].shape[0]),
            "target_modules": ",".join(sorted(factors)), "base_model": str(config.base_model_name_or_path or "")}
    with mlflow.start_run(run_name=f"expert-{name}") as run:
        mlflow.log_artifacts(str(folder), "adapter")
        mlflow.set_tags(tags)
    try:
        client.create_registered_model(name, tags={KIND_TAG: "expert"})
    except MlflowException:
        pass  # it exists: a new version of it
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id,
                                          tags=tags)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return version


def resolve_experts(uris: Sequence[str], *, tracking_uri: str | None = None,
                    directory: str | Path | None = None) -> list[dict[str, Any]]:
    """Download each expert's adapter folder: ``[{name, uri, version, folder}]`` in the order given. The name is
    the registered model's (``<name>-v<version>`` when one model is given twice)."""
    import mlflow
    from mlflow import MlflowClient

    from moa.pipelines.tracking.store import resolve_tracking_uri

    if not uris:
        raise UserError("a pool needs at least one expert URI (models:/<name>/<version> or models:/<name>@<alias>)")
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    client = MlflowClient()
    directory = Path(directory or tempfile.mkdtemp(prefix="moa-experts-"))
    experts = []
    for uri in uris:
        match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", uri)
        if match is None:
            raise UserError(f"expert URI {uri!r}: write models:/<name>/<version> or models:/<name>@<alias>")
        name = match.group(1)
        version = registered_version(uri, client)  # a missing model, version or alias: one line naming it
        if version.tags.get(KIND_TAG) != "expert":
            raise UserError(f"{uri} is not an expert (version {version.version} of {name!r} has no tag "
                             f"{KIND_TAG}=expert; register adapters with `moa expert register`)")
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                          dst_path=str(directory / f"{name}-v{version.version}")))
        experts.append({"name": name, "uri": uri, "version": str(version.version), "folder": folder})
    names = [e["name"] for e in experts]
    for expert in experts:
        if names.count(expert["name"]) > 1:
            expert["name"] = f"{expert['name']}-v{expert['version']}"
    if len({e["name"] for e in experts}) != len(experts):
        raise UserError(f"the same expert version is given twice: {list(uris)}")
    return experts


def routing_options(router: str, n_experts: int, top_k: int | None = None,
                    temperature: float | None = None) -> dict[str, Any]:
    """``moa.from_peft``'s router arguments for a pool of ``n_experts`` chosen the ``router`` way (:data:`ROUTINGS`):
    ``task``: static on ``task_ids``; ``arrow``: top ``top_k`` (default ``min(3, E)``) at ``temperature`` (1.0);
    ``uniform``: every expert with weight 1/E; ``learned``: a ``topk`` gate (default ``min(2, E)``) to train with
    :func:`train_pool_router`."""
    if router not in ROUTINGS:
        raise UserError(f"--router {router!r}: choose one of {list(ROUTINGS)}")
    if router in ("task", "uniform") and top_k is not None:
        raise UserError(f"--top-k sets Arrow's or the learned gate's experts per token; this pool's --router is {router!r}")
    if router != "arrow" and temperature is not None:
        raise UserError(f"--temperature sets Arrow's routing; this pool's --router is {router!r}")
    if router == "task":
        return {"router": "static", "router_options": {"key": "task_ids"}}
    if router == "uniform":
        return {"router": "uniform"}
    top_k = min(3 if router == "arrow" else 2, n_experts) if top_k is None else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise UserError(f"--top-k {top_k!r}: the {router} router picks between 1 and the pool's {n_experts} experts "
                        "per token")
    if router == "learned":
        return {"router": "topk", "top_k": top_k}
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise UserError(f"--temperature {temperature!r}: Arrow's softmax temperature must be a positive number")
    return {"router": "arrow", "top_k": top_k, "router_options": {"temperature": float(temperature)}}


def train_pool_router(model: moa.MoAModel, data, *, steps: int, lr: float = 0.01, seed: int = 0) -> list[float]:
    """Train only the routers' parameters of ``model`` (its experts and base stay frozen, bit for bit) for ``steps``
    batches of ``data`` (a :class:`moa.pipelines.data.text.TextData` with ``target="text"``: the pre-processing
    serving runs), cycling through its training rows; returns each step's loss (language-model loss plus the
    routers' auxiliary losses). The model is left in eval mode."""
    import torch

    gates = [p for name, p in model.named_parameters() if ".router." in name]
    if not gates:
        raise UserError("this pool has no router parameters to train (its router is not a learned one)")
    if steps < 1:
        raise UserError(f"--router-steps must be >= 1, got {steps}")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in gates:
        p.requires_grad_(True)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(gates, lr=lr)
    losses: list[float] = []
    model.train()
    try:
        while len(losses) < steps:
            for batch in data.train_dataloader():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
                loss = out.loss + model.aux_loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss))
                if len(losses) == steps:
                    break
    finally:
        model.eval()
        for p, flag in flags:
            p.requires_grad_(flag)
    return losses


def router_rows(path: str | Path, tokenizer: str | Path, *, prompt_template: str, max_length: int, seed: int = 0):
    """The :class:`TextData` a learned pool router trains on: a JSONL/CSV/Parquet file of ``text`` and ``target``
    columns (prompt and the answer wanted), encoded as the pool's served rows are (its tokenizer and template)."""
    from moa.pipelines.data.text import TextData

    if not Path(path).is_file():
        raise FileNotFoundError(f"--router-data {path}: no such file")
    return TextData(train=str(path), text_column="text", target_column="target", target="text",
                    tokenizer=str(tokenizer), prompt_template=prompt_template, max_length=max_length,
                    batch_size=8, val_fraction=0.0, split_seed=seed, bucket=False)


def gen_know_sub(adapters: Mapping[str, str | Path], general: Sequence[str | Path], directory: str | Path
                 ) -> dict[str, str]:
    """GenKnowSub (Bagherifard et al., ACL 2025; PEFT's ``ArrowConfig(use_gks=True)``): each adapter's ``lora_A``
    and ``lora_B`` minus the mean ``lora_A`` and mean ``lora_B`` of the ``general`` adapters (unscaled factors, as
    PEFT subtracts them), written as new adapter folders under ``directory``; returns ``{name: folder}``. All must
    adapt the same modules with the same rank."""
    import shutil

    from peft.utils import load_peft_weights
    from safetensors.torch import save_file

    states = [load_peft_weights(str(_adapter_folder(g)), device="cpu") for g in general]
    mean = {key: sum(state[key] for state in states) / len(states) for key in states[0]}
    experts = {name: load_peft_weights(str(_adapter_folder(folder)), device="cpu") for name, folder in adapters.items()}
    named = [*((s, f"expert {n!r}") for n, s in experts.items()),
             *((s, f"general adapter {str(g)!r}") for s, g in zip(states, general))]
    for state, what in named:  # all checked before anything is written
        if set(state) != set(mean) or any(state[k].shape != mean[k].shape for k in mean):
            raise UserError(f"GenKnowSub: {what} adapts other modules or ranks than the general adapters "
                            f"{[str(g) for g in general]}; all must share modules and rank")
    out = {}
    for name, state in experts.items():
        target = Path(directory) / name
        target.mkdir(parents=True)
        shutil.copy(Path(adapters[name]) / "adapter_config.json", target / "adapter_config.json")
        save_file({k: (v - mean[k]).contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"))
        out[name] = str(target)
    return out


def _adapter_folder(folder: str | Path) -> Path:
    from moa.peft_bridge import _read_adapter

    _read_adapter(Path(folder))  # a LoRA adapter moa imports, or one line naming the problem
    return Path(folder)


def assemble_pool(base_model, experts: Sequence[Mapping[str, Any]], *, base_task: bool = False,
                  base_name: str = "the given base", router: str = "task", top_k: int | None = None,
                  temperature: float | None = None, general: Sequence[Mapping[str, Any]] = ()) -> moa.MoAModel:
    """The base with one expert per entry of :func:`resolve_experts`, chosen the ``router`` way
    (:func:`routing_options`; ``task``: by ``task_ids``, expert i = task i); ``base_task`` (``task`` only): one more,
    last, that changes nothing (:data:`BASE_TASK` rows get the base alone); ``general`` (entries like ``experts``):
    :func:`gen_know_sub` of the experts first. A base the experts do not fit is refused naming the base each expert
    records and ``base_name``."""
    adapters = {e["name"]: str(e["folder"]) for e in experts}
    if base_task and router != "task":
        raise UserError(f"a pool routed by {router!r} reads no task, so it has no {BASE_TASK!r} task")
    options = routing_options(router, len(adapters), top_k, temperature)
    with tempfile.TemporaryDirectory() as tmp:
        if general:
            adapters = gen_know_sub(adapters, [e["folder"] for e in general], Path(tmp) / "gks")
        if base_task:
            adapters[BASE_TASK] = str(_null_adapter(Path(next(iter(adapters.values()))), Path(tmp) / BASE_TASK))
        try:
            return moa.from_peft(base_model, adapters, **options)
        except UserError as error:
            trained_on = sorted({_recorded_base(Path(e["folder"])) for e in experts})
            raise UserError(f"the pool's base {base_name} does not fit the experts {[e['name'] for e in experts]}, "
                            f"trained on the base {' / '.join(trained_on)} (recorded in their adapters): "
                            f"{error}") from None


def _recorded_base(adapter: Path) -> str:
    try:
        return repr(json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path"))
    except (OSError, ValueError, AttributeError):
        return "(not recorded)"


def _null_adapter(like: Path, folder: Path) -> Path:
    """A PEFT LoRA adapter folder whose only factors are zeros, on one module that ``like`` adapts: an expert that
    adds exactly nothing (rank 1; the pool pads it to the others' rank with zeros)."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    import torch

    from moa.peft_bridge import PEFT_PREFIX, _read_adapter

    config, factors = _read_adapter(like)
    module, (a, b) = next(iter(factors.items()))
    LoraConfig(r=1, lora_alpha=1, target_modules=[module.rsplit(".", 1)[-1]],
               base_model_name_or_path=config.base_model_name_or_path).save_pretrained(str(folder))
    save_file({f"{PEFT_PREFIX}{module}.lora_A.weight": torch.zeros(1, a.shape[1]),
               f"{PEFT_PREFIX}{module}.lora_B.weight": torch.zeros(b.shape[0], 1)},
              str(folder / "adapter_model.safetensors"))
    return folder


def write_pool_bundle(directory: str | Path, base: str | Path, uris: Sequence[str], *, tokenizer: str | None = None,
                      prompt_template: str = "{text}", max_length: int = 128, max_new_tokens: int = 32,
                      include_base: bool = False, tracking_uri: str | None = None, router: str = "task",
                      top_k: int | None = None, temperature: float | None = None, general: Sequence[str] = (),
                      router_data: str | Path | None = None, router_steps: int = 30, router_lr: float = 0.01,
                      seed: int = 0) -> Path:
    """A causal-LM serving bundle of the base (a pretrained name such as ``"smollm2-135m"``, a ``.gguf`` file or a
    local ``AutoModelForCausalLM`` folder) with the experts of ``uris``, chosen the ``router`` way
    (:func:`routing_options`): ``task``: the row's task names its expert, and the task :data:`BASE_TASK` the base
    alone; ``arrow`` / ``uniform``: rows name no task. ``tokenizer``: a folder (default: the base's, else
    MiniLM's). ``general``: URIs of general adapters whose mean is subtracted from every expert (GenKnowSub,
    :func:`gen_know_sub`). ``learned``: a top-k gate trained over the frozen experts on ``router_data``
    (:func:`router_rows`, :func:`train_pool_router`; rows name no task when served). The bundle references the base
    (:func:`moa.pipelines.kinds.text_bundle.base_reference`) unless ``include_base``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa.pretrained import minilm_dir, resolve_pretrained
    from moa.pipelines.data.text import DEFAULT
    from moa.pipelines.kinds.text_bundle import CAUSAL_LM, base_reference, write_bundle_files

    routing_options(router, len(uris), top_k, temperature)  # a bad choice is refused before anything is loaded
    if (router == "learned") != (router_data is not None):
        raise UserError("--router learned trains its gate on --router-data ROWS (text, target); other pools take none")
    if router_data is not None and not Path(router_data).is_file():
        raise FileNotFoundError(f"--router-data {router_data}: no such file")
    given = str(base)
    base = resolve_pretrained(given)  # a name or a GGUF: its cached folder
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a model folder (no config.json)")
    with tempfile.TemporaryDirectory() as tmp:
        experts = resolve_experts(uris, tracking_uri=tracking_uri, directory=tmp)
        if general:
            general = resolve_experts(general, tracking_uri=tracking_uri, directory=Path(tmp) / "general")
        by_task = router == "task"
        if by_task and BASE_TASK in [e["name"] for e in experts]:
            raise UserError(f"an expert named {BASE_TASK!r} would hide the pool's base-only task {BASE_TASK!r}: "
                            "register it under another name")
        model = assemble_pool(AutoModelForCausalLM.from_pretrained(str(base)).eval(), experts, base_task=by_task,
                              base_name=repr(given), router=router, top_k=top_k, temperature=temperature,
                              general=general).eval()
        source = Path(tokenizer) if tokenizer else (base if (base / "tokenizer_config.json").is_file() else minilm_dir())
        tok = AutoTokenizer.from_pretrained(str(source))
        trained = {}
        if router == "learned":
            data = router_rows(router_data, source, prompt_template=prompt_template, max_length=max_length, seed=seed)
            losses = train_pool_router(model, data, steps=router_steps, lr=router_lr, seed=seed)
            trained = {"router_training": {"rows": str(router_data), "steps": router_steps, "lr": router_lr,
                                           "seed": seed, "first_loss": losses[0], "last_loss": losses[-1]}}
    generation = model.model.generation_config
    eos = generation.eos_token_id if generation.eos_token_id is not None else (tok.eos_token_id or tok.sep_token_id)
    pad = generation.pad_token_id if generation.pad_token_id is not None else (tok.pad_token_id or 0)
    meta = {"format_version": 1, "moa_version": moa.__version__, "kind": CAUSAL_LM,
            "tasks": ([e["name"] for e in experts] + [BASE_TASK]) if by_task else [DEFAULT], "domains": [DEFAULT],
            "prompt_template": prompt_template, "routing": router,
            "max_length": max_length, "max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad,
            "base_class": type(model.model).__name__, "metrics": {},
            "experts": [{k: e[k] for k in ("name", "uri", "version")} for e in experts],
            **({"general": [{k: e[k] for k in ("name", "uri", "version")} for e in general]} if general else {}),
            **trained,
            **({} if include_base else base_reference(given))}
    return write_bundle_files(directory, model, tok, meta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moa expert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    reg = sub.add_parser("register", help="register a PEFT LoRA adapter folder as a new version of an expert")
    reg.add_argument("--adapter", type=Path, required=True, help="PEFT LoRA adapter folder (adapter_config.json)")
    reg.add_argument("--name", required=True)
    pool = sub.add_parser("pool", help="assemble a served pool (a causal-LM bundle) from expert URIs")
    pool.add_argument("--base", type=Path, required=True, help="smollm2-135m, a .gguf file or a local AutoModelForCausalLM folder")
    pool.add_argument("--expert", action="append", required=True, metavar="URI",
                      help="models:/<name>/<version> or models:/<name>@<alias> (repeat; order = task order)")
    pool.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    pool.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the base's, else MiniLM's)")
    pool.add_argument("--prompt-template", default="{text}")
    pool.add_argument("--max-new-tokens", type=int, default=32)
    pool.add_argument("--include-base", action="store_true", help="copy the base's weights into the bundle "
                      "(default: reference it by name or path, checked by checksum where the pool is loaded)")
    pool.add_argument("--router", choices=ROUTINGS, default="task", help="how the pool chooses experts: the row's "
                      "task names one (default; task 'base': none), arrow (token-wise, training-free: rows name no "
                      "task), uniform (every expert, equal weights) or learned (a top-k gate trained on "
                      "--router-data over the frozen experts: rows name no task)")
    pool.add_argument("--top-k", type=int, default=None, help="arrow / learned: experts per token (default "
                      "min(3, experts) / min(2, experts))")
    pool.add_argument("--router-data", type=Path, default=None, help="learned: rows (text, target) to train the gate on")
    pool.add_argument("--router-steps", type=int, default=30, help="learned: training steps (batches of 8)")
    pool.add_argument("--router-lr", type=float, default=0.01, help="learned: the gate's learning rate")
    pool.add_argument("--temperature", type=float, default=None, help="arrow: softmax temperature (default 1.0)")
    pool.add_argument("--general", action="append", default=[], metavar="URI", help="a general adapter (repeat): "
                      "their mean A and B are subtracted from every expert's first (GenKnowSub)")
    pool.add_argument("--register-as", default=None, help="also log the pool and register it as a new version "
                      "of this model (not promoted: a pool has no validation metric; serve models:/<name>/<version>)")
    for p in (reg, pool):
        p.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    from moa.pipelines.tracking.store import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_TRACKING_URI", resolve_tracking_uri(args.tracking_uri))
    if args.action == "register":
        version = register_expert(args.adapter, args.name, tracking_uri=args.tracking_uri)
        print(json.dumps({"name": version.name, "version": str(version.version), "alias": CHAMPION,
                          "source": version.source}))
        return 0
    bundle = write_pool_bundle(args.out, args.base, args.expert, tokenizer=args.tokenizer,
                               prompt_template=args.prompt_template, max_new_tokens=args.max_new_tokens,
                               include_base=args.include_base, tracking_uri=args.tracking_uri, router=args.router,
                               top_k=args.top_k, temperature=args.temperature, general=args.general,
                               router_data=args.router_data, router_steps=args.router_steps,
                               router_lr=args.router_lr)
    out: dict[str, Any] = {"bundle": str(bundle), "experts": json.loads((bundle / "service.json").read_text())["experts"]}
    if args.register_as:
        import mlflow

        from moa.pipelines.tracking.registry import log_bundle

        info = log_bundle(bundle, experiment=EXPERIMENT, tracking_uri=args.tracking_uri)
        out["version"] = str(mlflow.register_model(info.model_uri, args.register_as).version)
    print(json.dumps(out, indent=2))
    return 0
