"""Every program of a run is compiled once: ``fit`` with fused and single steps, evaluations and
logs on each placement (one device, pmap, sharding, fsdp on two fake CPU devices), and the
members of an ensemble built through one initialisation program.

Compilations are counted with JAX's public monitoring API: the backend-compile event fires
once per program JAX builds (whether compiled or loaded from the persistent cache), and names
it (``jit(step)``, ``pmap(multi)``, ...)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

# fit_counts(modes) -> {mode: {"counts": {program name: compilations during fit}, "steps", "evals"}}
FIT_COUNTS = r"""
import collections
import numpy as np, optax
from jax import monitoring
from fundl import models
from fundl.data import Loader
from fundl.train.fusion import Fusion
from fundl.train.loop import Every, evaluate, fit
from fundl.train.placement import make_placement
from fundl.train.state import create_train_state
from fundl.train.step import make_eval_step, make_train_step

def fit_counts(modes):
    counts = collections.Counter()
    def on_compile(event, seconds, fun_name="?", **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[fun_name] += 1
    rng = np.random.default_rng(0)
    train = {"x": rng.normal(size=(128, 6)).astype(np.float32), "y": rng.integers(0, 3, 128).astype(np.int32)}
    test = {"x": train["x"][:40], "y": train["y"][:40]}  # 16 + 16 + 8 (padded): one eval shape
    out = {}
    monitoring.register_event_duration_secs_listener(on_compile)
    try:
        for mode in modes:
            model, opt = models.mlp([16], 3), optax.adam(1e-2)
            state = create_train_state(model, opt, 0, (1, 6))
            placement = make_placement(mode, 0, min_size=8)
            step = make_train_step(model, opt, axis_name=placement.axis_name)
            eval_step = placement.compile_eval(make_eval_step(model, axis_name=placement.axis_name))
            eval_fn = lambda s: evaluate(eval_step, *placement.eval_params(s), test, 16, placement=placement.for_eval())
            counts.clear()
            marks = []  # (step, split, compilations so far) at every record
            result = fit(state, step, Loader(train, batch_size=16, drop_last=True), num_steps=13, eval_fn=eval_fn,
                         every=Every(log=5, eval=5), fusion=Fusion(steps_per_call=2), placement=placement,
                         progress=False, on_log=lambda r: marks.append((r["step"], r["split"], sum(counts.values()))))
            out[mode] = {"counts": dict(counts), "steps": int(result.state.step), "marks": marks,
                         "total": sum(counts.values())}
    finally:
        monitoring.unregister_event_duration_listener(on_compile)
    return out
"""

DRIVER = ("import json, sys, jax\njax.config.update('jax_num_cpu_devices', int(sys.argv[1]))\n" + FIT_COUNTS +
          "print(json.dumps(fit_counts(sys.argv[2:])))")


# fit's programs on the jit placements, by the name JAX gives them: one step, the fused step
# (lax.scan in ``multi``), the eval step.  (pmap's programs are all named ``_fun``.)
STEPS = ("step", "multi", "eval_step")


def compiles_through_fit(devices: int, modes: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(devices), *modes], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def check_once(mode: str, run: dict) -> None:
    """13 steps fused by 2, logged and evaluated at steps 5, 10 and 13: the steps up to 5 use the
    fused and the single step (2 + 2 + 1), then the first log and evaluation; after that every
    program has been used and nothing may compile again until the loop ends (the final state's
    copy to the host may compile its own small programs, once)."""
    counts, marks = run["counts"], run["marks"]
    assert run["steps"] == 13 and [(s, split) for s, split, _ in marks] == [
        (5, "train"), (5, "eval"), (10, "train"), (10, "eval"), (13, "train"), (13, "eval")]
    after_first_cycle = marks[-1][2] - marks[1][2]
    assert run["total"] >= 3 and after_first_cycle == 0, \
        f"{mode}: {after_first_cycle} compilations after every program had run once (all: {counts})"
    if mode != "pmap":
        for name in STEPS:
            found = {k: v for k, v in counts.items() if k.endswith(f"({name})")}
            assert list(found.values()) == [1], f"{mode}: {name} compiled {found} (all: {counts})"


@pytest.mark.slow
def test_fit_compiles_each_program_once_on_every_placement():
    runs = compiles_through_fit(2, ["none", "pmap", "sharding", "fsdp"])
    for mode, run in runs.items():
        check_once(mode, run)


@pytest.mark.slow
def test_fit_compiles_each_program_once_here():
    """The same on this process's one device (a quick check for ``make test-fast``)."""
    scope: dict = {}
    exec(FIT_COUNTS, scope)  # noqa: S102 - the driver's own code, run here without the fake devices
    check_once("none", scope["fit_counts"](["none"])["none"])


@pytest.mark.slow
def test_members_of_an_ensemble_share_one_init_program():
    """create_train_state compiles its init once for a model and optimiser (an ensemble's members,
    a sweep's seeds); an optimiser that cannot be hashed still works (compiled per call), with the
    same values."""
    import jax
    import numpy as np
    import optax
    from jax import monitoring

    from fundl import models
    from fundl.train.ensemble import stack_states
    from fundl.train.state import create_train_state

    counts: list[str] = []

    def on_compile(event, seconds, fun_name="?", **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts.append(fun_name)

    model, opt = models.mlp([5], 3), optax.adam(1e-3)
    create_train_state(model, opt, 0, (1, 7))  # compiled here (or earlier in the session)
    monitoring.register_event_duration_secs_listener(on_compile)
    try:
        states = [create_train_state(model, opt, seed, (1, 7)) for seed in range(4)]
        stacked = stack_states(states)
    finally:
        monitoring.unregister_event_duration_listener(on_compile)
    assert not [n for n in counts if "build" in n], counts  # no init compiled again
    assert [n for n in counts if "stack" in n] in ([], ["jit(_stack_leaves)"]), counts  # one program, once
    assert jax.tree.leaves(stacked)[0].shape[0] == 4

    class Unhashable(optax.GradientTransformation.__mro__[0]):
        __hash__ = None

    plain = create_train_state(model, Unhashable(opt.init, opt.update), 3, (1, 7))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(states[3])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("compute_dtype", ["float32", "float16"])
def test_create_train_state_from_an_int_seed_is_one_program(compute_dtype):
    """The key from the seed, the params, the optimiser state, the step and (float16) the loss
    scale come from one compiled program: eagerly, each small array would compile on its own, and
    a warm start (every program loaded from the persistent cache) pays for each.  The state equals
    the one built from the typed key of the same seed."""
    import jax
    import numpy as np
    import optax
    from jax import monitoring

    from fundl import models
    from fundl.train.state import create_train_state

    names: list[str] = []

    def on_compile(event, seconds, fun_name="?", **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(fun_name)

    model, opt = models.mlp([6], 2), optax.sgd(0.1)
    shape = (1, 11 if compute_dtype == "float32" else 13)  # a shape no other test builds: nothing cached
    monitoring.register_event_duration_secs_listener(on_compile)
    try:
        state = create_train_state(model, opt, 5, shape, compute_dtype=compute_dtype)
    finally:
        monitoring.unregister_event_duration_listener(on_compile)
    assert names == ["jit(_build)"], names
    assert (state.loss_scale is not None) == (compute_dtype == "float16")
    typed = create_train_state(model, opt, jax.random.key(5), shape, compute_dtype=compute_dtype)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(typed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
