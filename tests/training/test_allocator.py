"""The train stage's allocator on a CPU (``train.runtime.cpu_allocator``): the environment it re-executes
in, a real re-execution onto tcmalloc, and the warning where tcmalloc is missing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from pipeline import preload
from pipeline.training import allocator


def _fake_prefix(tmp_path, *names: str) -> str:
    (tmp_path / "lib").mkdir()
    for n in names:
        (tmp_path / "lib" / n).write_bytes(b"")
    return str(tmp_path)


def test_tcmalloc_goes_first_in_ld_preload_once(tmp_path):
    prefix = _fake_prefix(tmp_path, preload.TCMALLOC)
    lib = f"{prefix}/lib/{preload.TCMALLOC}"
    env = allocator.allocator_env("tcmalloc", {"PATH": "/bin"}, prefix, "linux-x86_64")
    assert env == {"PATH": "/bin", "LD_PRELOAD": lib, allocator.MARKER: "1"}
    assert allocator.in_use("tcmalloc", env) and not allocator.in_use("tcmalloc", {"PATH": "/bin"})
    # the user's own preload stays, after it
    env = allocator.allocator_env("tcmalloc", {"LD_PRELOAD": "/opt/libx.so"}, prefix, "linux-x86_64")
    assert env is not None and env["LD_PRELOAD"] == f"{lib}:/opt/libx.so"
    # nothing to do: the system's allocator asked for, re-executed already, preloaded already, not x86-64 Linux
    assert allocator.allocator_env("system", {}, prefix, "linux-x86_64") is None
    assert allocator.allocator_env("tcmalloc", {allocator.MARKER: "1"}, prefix, "linux-x86_64") is None
    assert allocator.allocator_env("tcmalloc", {"LD_PRELOAD": lib}, prefix, "linux-x86_64") is None
    assert allocator.allocator_env("tcmalloc", {}, prefix, "linux-aarch64") is None


def test_missing_tcmalloc_is_said_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setattr(preload, "find_lib", lambda name, prefix=None: None)
    monkeypatch.delenv(allocator.MARKER, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(preload.os, "execve", lambda *a: pytest.fail("re-executed"))
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        allocator.reexec_with_allocator("tcmalloc", "stages.train", [], on_gpu=False)
    assert "train.runtime.cpu_allocator: tcmalloc not found" in caplog.text
    caplog.clear()
    allocator.reexec_with_allocator("system", "stages.train", [], on_gpu=False)
    allocator.reexec_with_allocator("tcmalloc", "stages.train", [], on_gpu=True)  # GPUs: unchanged, unsaid
    assert caplog.text == ""


PROBE = (
    "import sys\n"
    "from pipeline.training import allocator\n"
    "allocator.reexec_with_allocator(sys.argv[1], 'probe_mod', sys.argv[1:], on_gpu=sys.argv[2] == 'gpu')\n"
    "print('ARGS', sys.argv[1:], 'MAPPED', 'libtcmalloc_minimal' in open('/proc/self/maps').read())\n"
)


@pytest.mark.parametrize(
    "choice,where,mapped", [("tcmalloc", "cpu", True), ("system", "cpu", False), ("tcmalloc", "gpu", False)]
)
def test_the_stage_process_re_executes_onto_tcmalloc(tmp_path, choice, where, mapped):
    """A real re-execution: the new process has the same arguments and tcmalloc mapped."""
    if not os.path.isfile(os.path.join(sys.prefix, "lib", preload.TCMALLOC)):
        pytest.skip("scripts/setup.sh installs tcmalloc on x86-64 Linux")
    (tmp_path / "probe_mod.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARKER)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd()])
    out = subprocess.run(
        [sys.executable, "-m", "probe_mod", choice, where], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("ARGS"))
    assert line == f"ARGS {[choice, where]!r} MAPPED {mapped}"
