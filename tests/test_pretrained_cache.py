"""The GGUF cache of :mod:`moa.pretrained`: two processes that ask for the same GGUF at once convert it once, and
neither sees a half-written folder. The conversion itself is replaced by a stand-in (the real one, on SmolLM2, is
what ``tests/test_smollm2.py`` loads): it records each call, and waits until the other process is blocked on the
cache's lock (a waiter in ``/proc/locks``) before it writes, so the two requests truly overlap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import moa.pretrained as pretrained

    log, gguf, me = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def convert(path, out):
        with open(log, "a") as f:
            f.write(me + "\\n")
        deadline = time.monotonic() + 20  # the other process, blocked on the lock: a waiter line ("->") appears
        while time.monotonic() < deadline and "->" not in Path("/proc/locks").read_text():
            time.sleep(0.01)
        (out / "weights.bin").write_bytes(b"w" * 1000)
        (out / "config.json").write_text("{}")

    pretrained._convert_gguf = convert
    (log.parent / f"ready-{me}").touch()
    while not all((log.parent / f"ready-{x}").exists() for x in ("a", "b")):
        time.sleep(0.01)
    print(pretrained.gguf_folder(gguf))
""")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks (Linux)")
def test_two_processes_asking_for_one_gguf_at_once_convert_it_once(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    log = tmp_path / "conversions.log"
    env = {**os.environ, "MOA_CACHE": str(tmp_path / "cache")}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(log), str(gguf), me], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for me in ("a", "b")]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in outputs]
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1 and len(log.read_text().split()) == 1  # one conversion, one folder for both
    folder = Path(folders.pop())
    assert (folder / "weights.bin").stat().st_size == 1000
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.startswith(".")) == [folder.name]
    assert not [p for p in folder.parent.iterdir() if ".new-" in p.name]  # no temporary folder left behind
