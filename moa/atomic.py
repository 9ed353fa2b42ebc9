"""All-or-nothing folders: a save writes the whole folder beside its target, then swaps it in with renames.

    with atomic_folder("ckpt") as tmp:      # a fresh sibling folder, ".ckpt.new-<pid>-<random>"
        write everything into tmp
    # on leaving: each file hashed into moa_manifest.json and fsynced (with every folder), then
    #   ckpt -> .ckpt.old (backup), tmp -> ckpt, fsync the parent, remove the backup

A kill at any moment leaves the old folder or the new one under the target name, or (between the two renames) no
target and a complete backup: :func:`readable` returns the backup then, and the next save puts it back first.
Leftover temporary folders of dead writers are removed by the next save. One writer per folder at a time; a reader
that overlaps a swap may see files of both versions, which :func:`verify` reports as a checksum mismatch.

``moa_manifest.json`` records the sha256 and size of each file the save wrote; :func:`verify` checks them and
names the file that is missing, truncated or corrupted. :func:`read_json` / :func:`read_safetensors` raise errors
that name the file. Files in the target that the save did not write (a tokenizer saved into the same folder) are
kept with ``keep_others=True`` (hard-linked into the new folder, outside the manifest). One file: :func:`atomic_file`
(written beside the target, fsynced, renamed over it); one text file: :func:`write_text`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from moa.experts.errors import UserError

MANIFEST = "moa_manifest.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def write_manifest(root: Path) -> dict[str, Any]:
    """Hash and fsync every file under ``root`` (and its folders), then write ``moa_manifest.json``."""
    files = {}
    for path in _files(root):
        if path.name == MANIFEST and path.parent == root:
            continue
        files[path.relative_to(root).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
        _fsync(path)
    manifest = {"format": "moa-manifest", "format_version": 1, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(root / MANIFEST)
    for folder in sorted({p.parent for p in _files(root)}, key=lambda p: -len(p.parts)):
        _fsync(folder)
    return manifest


def _siblings(path: Path) -> tuple[Path, re.Pattern]:
    return path.parent / f".{path.name}.old", re.compile(rf"\.{re.escape(path.name)}\.new-(\d+)-")


def recover(path: Path) -> None:
    """Finish a swap a kill interrupted: put the backup back if the target is missing, else drop the backup;
    remove the temporary folders of writers that are no longer alive."""
    backup, pattern = _siblings(path)
    if backup.is_dir():
        if path.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(backup, path)
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match and not _alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # one writer per folder: a folder of this process is from an earlier, failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def readable(path: str | os.PathLike) -> Path:
    """The folder to read ``path`` from: itself, or its complete backup while a swap is half done."""
    path = Path(path)
    backup, _ = _siblings(path)
    return backup if not path.exists() and backup.is_dir() else path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, keep_others: bool = False) -> Iterator[Path]:
    """Yield an empty sibling folder to write into; on success swap it into place as ``path`` (see the module
    docstring); on an exception remove it and leave ``path`` as it was."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    backup, _ = _siblings(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-{os.getpid()}-"))
    try:
        yield tmp
        write_manifest(tmp)
        if keep_others and path.is_dir():
            _carry_over(path, tmp)
        if path.exists():
            os.rename(path, backup)
        os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` the files of ``old`` that no save of it wrote (not in its manifest); each
    one and the folders that received them are fsynced (the links came after :func:`write_manifest`'s fsyncs)."""
    try:
        ours = set(json.loads((old / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError):
        ours = {MANIFEST}
    carried = []
    for path in _files(old):
        rel = path.relative_to(old).as_posix()
        target = new / rel
        if rel in ours or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        _fsync(target)
        carried.append(target)
    folders = {parent for target in carried for parent in target.relative_to(new).parents}
    for folder in sorted(folders, key=lambda p: -len(p.parts)):  # deepest first: a new subfolder, then its parent
        _fsync(new / folder)


def verify(folder: str | os.PathLike, names: list[str] | None = None) -> bool:
    """Check the files of ``folder``'s manifest (or only ``names``) against their recorded size and sha256;
    ``False`` when there is no manifest (a folder saved before manifests). Raises naming the bad file."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    files = read_json(manifest_path).get("files", {})
    for rel in names if names is not None else sorted(files):
        if rel not in files:
            raise UserError(f"{folder / rel} is not in {manifest_path}: the folder was not written by one save")
        path, entry = folder / rel, files[rel]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed in {manifest_path})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"{path} is truncated or corrupted: {size} bytes, {entry['bytes']} when it was saved")
        if sha256(path) != entry["sha256"]:
            raise UserError(f"{path} is corrupted: its sha256 does not match the one recorded at save in "
                             f"{manifest_path}")
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a path beside ``path`` (not created) to write one file to; on success fsync it and rename it over
    ``path``, so a reader sees the old file or the new one, never part of one; on an exception remove it and leave
    ``path`` as it was."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`: a stop mid-write keeps the previous file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _named(path: Path, what: str, read: Callable[[], Any]) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return read()
    except Exception as error:  # noqa: BLE001 - re-raised with the file's name
        raise UserError(f"cannot read {what} {path}: {error}") from error


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    return _named(path, "the JSON file", lambda: json.loads(path.read_text()))


def read_safetensors(path: str | os.PathLike):
    from safetensors.torch import load_file

    path = Path(path)
    return _named(path, "the weights", lambda: load_file(str(path)))
