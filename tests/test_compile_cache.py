"""The persistent compilation cache (fundl.train.compile_cache): where it lives, that the user
can switch it off or replace it, and that processes sharing it get each other's programs.

JAX initialises its cache once per process, so each case runs in a fresh Python process (the
driver below) with its own HOME and cache folders under tmp_path: nothing is written to the
real ~/.cache.  The suite itself runs under the session cache of tests/conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from fundl.train import compile_cache

# enable, compile a few programs through fundl (state, step), report what JAX did
DRIVER = r"""
import json, sys
import jax, jax.numpy as jnp, optax
from jax import monitoring
from fundl import models
from fundl.train.compile_cache import enable_compilation_cache
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step

events = {"hits": 0, "compiles": 0}
def on_event(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
def on_duration(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
        events["compiles"] += 1
monitoring.register_event_listener(on_event)
monitoring.register_event_duration_secs_listener(on_duration)
if sys.argv[1] == "user-config":
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
folder = enable_compilation_cache()
model, opt = models.mlp([int(sys.argv[-1])], 3), optax.sgd(0.1)
state = create_train_state(model, opt, 0, (8, 4))
state, metrics = jax.jit(make_train_step(model, opt))(state, {"x": jnp.ones((8, 4)), "y": jnp.zeros(8, jnp.int32)})
jax.block_until_ready(metrics)
print(json.dumps({"folder": None if folder is None else str(folder), "jax_dir": jax.config.jax_compilation_cache_dir,
                  "loss": float(metrics["loss"]),
                  "max_size": jax.config.jax_compilation_cache_max_size, **events}))
"""


def run_driver(tmp_path, *args, width=5, env=None, popen=False):
    """The driver in a fresh process: HOME and XDG under tmp_path, no cache settings inherited
    from the test session unless ``env`` gives them."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "FUNDL_CACHE_DIR", "XDG_CACHE_HOME", compile_cache.SWITCH_ENV)}
    base.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-c", DRIVER, *(args or ("plain",)), str(width)]
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, cwd=tmp_path, env=base, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1]), out.stderr


def entries(folder):
    return sorted(p.name for p in folder.glob("*-cache")) if folder.is_dir() else []


def test_the_cache_lives_in_the_user_cache(monkeypatch, tmp_path):
    """``~/.cache/fundl/compilation``; ``$XDG_CACHE_HOME`` replaces ``~/.cache``; ``$FUNDL_CACHE_DIR``
    replaces ``~/.cache/fundl`` (the user cache of fundl.data.paths)."""
    for name in ("FUNDL_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.compilation_cache_dir() == tmp_path / "home" / ".cache" / "fundl" / "compilation"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.compilation_cache_dir() == tmp_path / "xdg" / "fundl" / "compilation"
    monkeypatch.setenv("FUNDL_CACHE_DIR", str(tmp_path / "c"))
    assert compile_cache.compilation_cache_dir() == tmp_path / "c" / "compilation"


@pytest.mark.slow
def test_processes_sharing_the_cache_finish_and_the_next_one_compiles_nothing(tmp_path):
    """Three processes start together on an empty cache (the default place, HOME under tmp_path)
    and compile the same programs, each writing every entry it misses; then one more process
    finds them all.  JAX reports an entry it cannot read (one half written by another process)
    as a warning, "Error reading persistent compilation cache", which must not appear."""
    default = tmp_path / "home" / ".cache" / "fundl" / "compilation"
    procs = [run_driver(tmp_path, width=64, popen=True) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "persistent compilation cache" not in err.lower(), err
        first = json.loads(out.splitlines()[-1])
        assert first["folder"] == first["jax_dir"] == str(default / compile_cache.host_folder())
        assert first["max_size"] == compile_cache.MAX_BYTES  # bounded: JAX locks the folder (filelock)
    assert len(entries(default / compile_cache.host_folder())) == first["compiles"] > 0
    after, err = run_driver(tmp_path, width=64)
    assert after["hits"] == after["compiles"] == first["compiles"], err  # nothing compiled again
    assert after["loss"] == first["loss"]  # the loaded program computes what the compiled one did
    assert "persistent compilation cache" not in err.lower()


@pytest.mark.slow
def test_switched_off_it_writes_nothing_and_the_users_jax_setting_wins(tmp_path):
    cache, users = tmp_path / "c", tmp_path / "users-jax-cache"
    off, _ = run_driver(tmp_path, env={"FUNDL_CACHE_DIR": str(cache), compile_cache.SWITCH_ENV: "0"})
    assert off["folder"] is None and off["jax_dir"] is None and off["hits"] == 0
    assert not cache.exists() and not (tmp_path / "home").exists()
    # jax.config.update before fundl's first call (JAX_COMPILATION_CACHE_DIR: the session test below)
    configured, _ = run_driver(tmp_path, "user-config", str(users), env={"FUNDL_CACHE_DIR": str(cache)})
    assert configured["folder"] is None and configured["jax_dir"] == str(users) and not cache.exists()
    assert entries(users)


def test_the_test_session_uses_its_own_temporary_cache_never_the_users():
    """tests/conftest.py sets JAX_COMPILATION_CACHE_DIR for the session (workers and subprocesses
    inherit it): fundl's default then leaves JAX's setting alone."""
    assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert compile_cache.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert not os.environ["JAX_COMPILATION_CACHE_DIR"].startswith(str(compile_cache.compilation_cache_dir()))
