"""All-or-nothing folders: MoAModel.save_pretrained, the recommender's save and the serving bundle, killed with
SIGKILL at random moments of repeated saves, always load as the old version or the new one; corrupted or
truncated files are detected against the manifest's sha256 and named."""

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import moa
from moa.atomic import MANIFEST
from moa.pipelines.kinds.recommender.module import tiny_encoder
from moa.pipelines.kinds.recommender.service import TABLES_FILE, RecommendationService, item_table, write_bundle
from moa.recsys.data import ml100k
from moa.recsys.loading import load_recommender
from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender

DOMAINS = ["comedy", "drama"]


def fill(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.fill_(value)


# -- the MoA model: version v has r = 4 (even v) or 8 (odd v) and every adapter weight equal to v
def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))


MOA = {r: moa.attach(base(), moa.MoAConfig(n_experts=4, r=r, router="static", target_modules=["0", "1"]))
       for r in (4, 8)}


def save_moa(folder, v):
    model = MOA[8 if v % 2 else 4]
    fill(model, v)
    model.save_pretrained(folder)


def check_moa(folder):
    loaded = moa.load(folder, base())  # a new weights file beside the other version's config fails here
    v = int(next(iter(loaded.moa_state_dict().values())).flatten()[0].item())
    assert loaded.config.r == (8 if v % 2 else 4), f"version {v}'s weights beside another version's config"
    return v


# -- the recommender and the bundle: version v has dropout v/1000 in its config and user-encoder weights v
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    dataset = ml100k()
    config = RecommenderConfig(encoder=str(tiny_encoder(root / "encoder")), adapted_layers=1, r=4, hidden=16,
                               inner=32, user_layers=1, max_len=20)
    torch.manual_seed(0)
    model = TextSeqRecommender.build(DOMAINS, {d: dataset.domain(d).texts for d in DOMAINS}, config=config).eval()
    for d in DOMAINS:
        model.item_table(d)  # cached: the children only write files
    return {"root": root, "model": model, "items": item_table(dataset, DOMAINS)}


def mark(model, v):
    model.config.dropout = v / 1000
    fill(model.heads, v)


def version_of(model):
    v = round(model.config.dropout * 1000)
    assert next(model.heads.parameters()).flatten()[0].item() == v, "weights and config of different versions"
    return v


def kill_rounds(folder, watch, save, check, rounds, seed=0):
    """Fork a child that saves versions v, v+1, ... into ``folder`` forever; SIGKILL it at a random moment (after
    0-2 completed saves: at once, when ``folder/watch`` is replaced, or when a temporary sibling appears; found by
    polling); then the folder must load as the last completed version or the one in progress."""
    rng, last = random.Random(seed), check(folder)
    v = last + 1
    for _ in range(rounds):
        inode = (folder / watch).stat().st_ino
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(read_end)
                torch.set_num_threads(1)
                for i in range(v, v + 10_000):
                    save(folder, i)
                    os.write(write_end, b"x")
            finally:
                os._exit(1)
        os.close(write_end)
        done = 0
        for _ in range(rng.randint(0, 2)):
            got = os.read(read_end, 1)
            assert got, "the saving child died"
            done += 1
        mode, deadline = rng.choice(["now", "replaced", "sibling"]), time.monotonic() + 5
        while mode != "now" and time.monotonic() < deadline:
            try:
                if mode == "replaced" and (folder / watch).stat().st_ino != inode:
                    break
            except FileNotFoundError:
                break
            if mode == "sibling" and any(p.name.startswith(f".{folder.name}.") for p in folder.parent.iterdir()):
                break
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(read_end, 4096):
            done += len(chunk)
        os.close(read_end)
        found = check(folder)
        allowed = {v + done - 1 if done else last, v + done}
        assert found in allowed, f"after a kill ({mode}) the folder holds version {found}, expected one of {allowed}"
        last, v = found, v + done + 1
    save(folder, v)  # the next save cleans up after the killed ones
    assert check(folder) == v
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")] == []


def test_moa_save_pretrained_survives_kills(tmp_path):
    folder = tmp_path / "ckpt"
    save_moa(folder, 0)
    kill_rounds(folder, "moa_model.safetensors", save_moa, check_moa, rounds=40)


def test_recommender_save_survives_kills(world, tmp_path):
    model, folder = world["model"], tmp_path / "rec"

    def save(folder, v):
        mark(model, v)
        model.save(folder)

    save(folder, 0)
    kill_rounds(folder, "recommender.safetensors", save, lambda f: version_of(load_recommender(f)), rounds=20, seed=1)


def test_bundle_survives_kills(world, tmp_path):
    model, folder = world["model"], tmp_path / "bundle"

    def save(folder, v):
        mark(model, v)
        write_bundle(folder, {"experts": model}, world["items"], metrics={"val/ndcg_10": v})

    def check(folder):
        service = RecommendationService.from_bundle(folder)
        v = round(service.meta["metrics"]["val/ndcg_10"])
        assert {version_of(m) for m in service.models.values()} == {v}, "service.json of another version"
        return v

    save(folder, 0)
    kill_rounds(folder, "service.json", save, check, rounds=20, seed=2)


def test_failed_bundle_write_leaves_the_old_bundle(world, tmp_path):
    folder = write_bundle(tmp_path / "bundle", {"experts": world["model"]}, world["items"], metrics={"val/ndcg_10": 1})
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="must list items"):
        write_bundle(folder, {"experts": world["model"]}, world["items"].iloc[:-1])
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_corrupted_moa_weights_are_named(tmp_path, how):
    save_moa(tmp_path / "ckpt", 3)
    weights = tmp_path / "ckpt" / "moa_model.safetensors"
    corrupt(weights, how)
    with pytest.raises(ValueError, match=f"{weights}.*(truncated|corrupted)"):
        moa.load(tmp_path / "ckpt", base())


def test_moa_load_errors_name_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    save_moa(folder, 2)
    (folder / MANIFEST).unlink()  # a folder saved before manifests still loads
    assert check_moa(folder) == 2
    (folder / "moa_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot read the JSON file {folder / 'moa_config.json'}"):
        moa.load(folder, base())
    (folder / "moa_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "moa_config.json")):
        moa.load(folder, base())
    save_moa(folder, 2)
    (folder / "moa_model.safetensors").write_bytes(b"\x00" * 16)
    (folder / MANIFEST).unlink()
    with pytest.raises(ValueError, match=f"cannot read the weights {folder / 'moa_model.safetensors'}"):
        moa.load(folder, base())


def test_corrupted_recommender_and_bundle_files_are_named(world, tmp_path):
    model = world["model"]
    rec = model.save(tmp_path / "rec")
    corrupt(rec / "recommender.safetensors", "flipped")
    with pytest.raises(ValueError, match=f"{rec / 'recommender.safetensors'} is corrupted"):
        load_recommender(rec)
    bundle = write_bundle(tmp_path / "bundle", {"experts": model}, world["items"], metrics={"val/ndcg_10": 1})
    corrupt(bundle / TABLES_FILE, "truncated")
    with pytest.raises(ValueError, match=f"{bundle / TABLES_FILE} is truncated"):
        RecommendationService.from_bundle(bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())["files"]
    assert {"service.json", "items.parquet", TABLES_FILE, "recommenders/experts/recommender.safetensors"} <= set(manifest)


def test_other_files_in_a_model_folder_are_kept(tmp_path):
    folder = tmp_path / "ckpt"
    save_moa(folder, 0)
    (folder / "tokenizer.json").write_text("{}")
    save_moa(folder, 1)
    assert (folder / "tokenizer.json").read_text() == "{}" and check_moa(folder) == 1


class _RecordingOs:
    """``os`` for moa.atomic, recording the calls that make a save durable: ("fsync", path, size at the call),
    ("rename", src, dst), ("link", dst). Everything else is the real ``os``."""

    def __init__(self):
        self.events, self._paths = [], {}

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, *args, **kwargs):
        fd = os.open(path, flags, *args, **kwargs)
        self._paths[fd] = Path(path)
        return fd

    def fsync(self, fd):
        self.events.append(("fsync", self._paths[fd], os.fstat(fd).st_size))
        os.fsync(fd)

    fdatasync = fsync

    def rename(self, src, dst):
        self.events.append(("rename", Path(src), Path(dst)))
        os.rename(src, dst)

    replace = rename

    def link(self, src, dst, **kwargs):
        self.events.append(("link", Path(dst)))
        os.link(src, dst, **kwargs)


def test_atomic_folder_fsyncs_each_file_before_the_swap_and_the_parent_after(tmp_path, monkeypatch):
    """SIGKILL keeps the page cache, so the kill tests cannot see a missing fsync (a power cut would): the calls are
    recorded instead. Every file of the new folder (written by the save, the manifest, one carried over from the old
    folder) is fsynced at its final size before the rename that swaps the folder in, every folder after its last
    entry arrived and before that rename, and the parent folder after it."""
    import moa.atomic as atomic

    target = tmp_path / "ckpt"
    with atomic.atomic_folder(target) as tmp:  # the old version
        (tmp / "weights.bin").write_bytes(b"old")
    (target / "extra" / "tokenizer.json").parent.mkdir()
    (target / "extra" / "tokenizer.json").write_text("{}")  # another tool's file, kept by the next save
    recorder = _RecordingOs()
    monkeypatch.setattr(atomic, "os", recorder)
    with atomic.atomic_folder(target, keep_others=True) as tmp:
        (tmp / "weights.bin").write_bytes(os.urandom(200_000))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part.json").write_text('{"a": 1}')
    events = recorder.events

    swap = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == target)
    tmp = events[swap][1]
    files = {p.relative_to(target) for p in target.rglob("*") if p.is_file()}
    assert files == {Path("weights.bin"), Path("sub/part.json"), Path(MANIFEST), Path("extra/tokenizer.json")}
    for rel in files:
        size = (target / rel).stat().st_size
        assert ("fsync", tmp / rel, size) in events[:swap], f"{rel} was not fsynced at its final size before the swap"
    for folder in {Path(".")} | {p.relative_to(target) for p in target.rglob("*") if p.is_dir()}:
        synced = [i for i, e in enumerate(events[:swap]) if e[:2] == ("fsync", tmp / folder)]
        last_entry = max((i for i, e in enumerate(events) if e[0] == "link" and e[1].parent == tmp / folder),
                         default=-1)
        assert synced and synced[-1] > last_entry, f"folder {folder} not fsynced after its last entry, before the swap"
    assert any(e[:2] == ("fsync", tmp_path) for e in events[swap + 1:]), "the parent was not fsynced after the swap"


def test_atomic_text_file_is_fsynced_then_renamed_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    """``write_text`` (the results files of bench/): the new text reaches the disk (fsynced at its full size) before
    the rename over the target, the parent folder is fsynced after it; a write that raises leaves the old file and
    nothing beside it."""
    import moa.atomic as atomic

    target = tmp_path / "results" / "table.txt"
    atomic.write_text(target, "old\n")
    recorder = _RecordingOs()
    monkeypatch.setattr(atomic, "os", recorder)
    atomic.write_text(target, "new " * 1000)
    assert target.read_text() == "new " * 1000
    swap = next(i for i, e in enumerate(recorder.events) if e[0] == "rename" and e[2] == target)
    written = recorder.events[swap][1]
    assert written.parent == target.parent and written != target
    assert ("fsync", written, 4000) in recorder.events[:swap], "the new text was not fsynced before the rename"
    assert any(e[:2] == ("fsync", target.parent) for e in recorder.events[swap + 1:]), "parent not fsynced after"

    with pytest.raises(ZeroDivisionError):
        with atomic.atomic_file(target) as tmp:
            tmp.write_text("half")
            1 / 0
    assert target.read_text() == "new " * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.txt"]
