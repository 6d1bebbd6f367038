"""Advisory locks: a second process is told who holds a folder, or waits for it; concurrent
harvests into one store and concurrent first builds of the model cache are safe."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from badinput import run_cli_case

from saelab.data.store import ActivationStore
from saelab.errors import LockedError
from saelab.locks import hold_lock, lock_file

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_second_process_is_told_the_holders_pid(tmp_path):
    folder = tmp_path / "runs" / "demo"
    with hold_lock(folder, "train"):
        assert lock_file(folder).is_file()
        p = _python(f"""
            from saelab.locks import hold_lock
            from saelab.errors import LockedError
            try:
                with hold_lock({str(folder)!r}, "harvest"):
                    print("got it")
            except LockedError as e:
                print("locked:", e)
        """)
        out, err = p.communicate(timeout=60)
    assert out.strip() == (f"locked: {folder} is in use by saelab pid {os.getpid()} (train); "
                           f"wait for it or choose another --out"), (out, err)
    assert not lock_file(folder).exists()  # released and tidied
    with hold_lock(folder, "again"):  # free again
        pass


def test_waiter_gets_the_lock_when_the_holder_exits(tmp_path):
    folder = tmp_path / "store"
    holder = _python(f"""
        import sys, time
        from saelab.locks import hold_lock
        with hold_lock({str(folder)!r}, "harvest"):
            print("held", flush=True)
            time.sleep(1.5)
    """)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with pytest.raises(LockedError, match=f"pid {holder.pid} \\(harvest\\).*waited 0.3 s"):
        with hold_lock(folder, "test", wait=True, timeout=0.3):
            pass
    with hold_lock(folder, "test", wait=True, timeout=60):
        assert holder.poll() is not None  # we only got in after it finished
    assert time.monotonic() - t0 > 1.0
    holder.communicate()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "store"
    holder = _python(f"""
        import time
        from saelab.locks import hold_lock
        with hold_lock({str(folder)!r}, "harvest"):
            print("held", flush=True)
            time.sleep(600)
    """)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.communicate()
    assert lock_file(folder).exists()  # the file stays, but the kernel dropped the lock
    with hold_lock(folder, "test"):
        pass


def test_reentrant_within_a_process(tmp_path):
    with hold_lock(tmp_path / "x", "outer"), hold_lock(tmp_path / "x", "inner"):
        assert lock_file(tmp_path / "x").exists()
    assert not lock_file(tmp_path / "x").exists()


def _harvest_argv(tiny, out: Path) -> list[str]:
    lm, corpus = tiny
    return ["-m", "saelab", "harvest", "--model", str(lm), "--dataset", str(corpus),
            "--hook", "blocks.1.hook_resid_post", "--device", "cpu", "--model-dtype",
            "float32", "--context-size", "16", "--tokens", "600", "--shard-rows", "100",
            "--quiet", "--out", str(out)]


@pytest.mark.slow  # two real processes, each importing torch and loading the LM
def test_two_harvests_into_one_new_store(tiny, tmp_path):
    out = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, *_harvest_argv(tiny, out)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, results, strict=True):
        assert p.returncode == 0 and "Traceback" not in e, e
        assert "rows 600" in o
    store = ActivationStore.open(out)
    store.verify()
    assert store.complete and store.num_rows == 600


def test_harvest_waits_for_a_store_being_written_and_reuses_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "store"
    with hold_lock(out, "harvest"):
        waiter = subprocess.Popen([sys.executable, *_harvest_argv(tiny, out)], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        note = waiter.stderr.readline()
        assert note.startswith(f"note: {out} is in use by saelab pid {os.getpid()}"), note
        # while it waits, this process (holding the lock) writes the store
        assert run_cli_case(_harvest_argv(tiny, out)[2:]).code == 0
        inodes = {p.name: p.stat().st_ino for p in out.iterdir()}
    o, e = waiter.communicate(timeout=300)
    assert waiter.returncode == 0 and "rows 600" in o, e
    assert {p.name: p.stat().st_ino for p in out.iterdir()} == inodes  # reused, not rewritten


def test_concurrent_first_builds_of_the_model_cache(tmp_path):
    """Two first runs race to convert the embedded model: one builds, the other waits and
    reuses it (the conversion is replaced by a slow fake that counts its calls)."""
    code = f"""
        import json, os, time
        from pathlib import Path
        import saelab.models.loading as L
        L.embedded_gguf_path = lambda: Path({str(tmp_path / 'fake.gguf')!r})
        def fake_build(gguf, target, source):
            with open({str(tmp_path / 'builds.log')!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(1.0)
            target.mkdir(parents=True)
            for name in L._CACHE_FILES:
                (target / name).write_text(json.dumps(source) if name == L._SOURCE_FILE else "x")
        L._build_embedded_cache = fake_build
        print(L.embedded_model_dir())
    """
    (tmp_path / "fake.gguf").write_bytes(b"gguf")
    env = {**ENV, "SAELAB_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _ in outs}) == 1
    assert len((tmp_path / "builds.log").read_text().split()) == 1
