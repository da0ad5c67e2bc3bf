"""Subprocess body of tests/test_parallel.py and tests/test_multihost.py.

Trains the same three small models (an MLP, a CNN with batch norm, an LSTM)
for 20 steps of SGD with momentum from the same initial state on the same
global batches, through ``fundl.train.loop.fit`` with each placement asked
for, evaluating inside ``fit`` (steps 10 and 20, as ``fundl.run.experiment``
does: ``placement.eval_params`` of the state fit hands over, counting the
host placements that takes) and again after it from the returned plain state;
writes the final states, logged losses and eval results to an .npz
(process 0 only).  SGD rather than Adam on purpose: Adam
would hide gradients that are N times too large.

    python tests/parallel_worker.py OUT.npz MODE[:DEVICES[:K[:MODELS]]] ...

MODE is none | pmap | sharding | fsdp | fsdp_tp (fsdp on a 2 x 2 data x model mesh with
partition rules), DEVICES the local devices (0: all), K the
fused steps per call, MODELS e.g. ``mlp+lstm`` (default: mlp, cnn_bn, lstm;
``mlp_dropout`` on request).  Device counts and multi-process settings come from
the environment (FUNDL_* variables, see fundl/run/distributed.py).  ``bn`` as a
MODE instead compares a pmapped batch-norm layer with one call on the global
batch; ``fsdp_memory`` reports XLA's memory analysis of a replicated and an FSDP step.
"""

from __future__ import annotations

import contextlib
import sys
import time

from fundl.run import distributed  # noqa: E402

distributed.initialize(distributed.settings_from())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fundl import models, nn  # noqa: E402
from fundl.data import Loader  # noqa: E402
from fundl.train.checkpoint import flatten_state  # noqa: E402
from fundl.train.fusion import Fusion  # noqa: E402
from fundl.train.loop import Every, evaluate, fit  # noqa: E402
from fundl.train.placement import arrays, make_placement, state_bytes  # noqa: E402
from fundl.train.state import create_train_state  # noqa: E402
from fundl.train.step import make_eval_step, make_train_step  # noqa: E402

GLOBAL_BATCH, STEPS, NUM_TRAIN, NUM_TEST = 32, 20, 160, 40
SHAPES = {"mlp": (20,), "cnn_bn": (8, 8, 3), "lstm": (12, 6), "mlp_dropout": (20,)}
DEFAULT_KINDS = ("mlp", "cnn_bn", "lstm")


def build(kind: str, axis_name):
    if kind == "mlp":
        return models.mlp([32], 10)
    if kind == "mlp_dropout":
        return models.mlp([32], 10, dropout=0.5)
    if kind == "cnn_bn":
        return models.cnn([8], [16], 10, batch_norm=True, axis_name=axis_name)  # one conv block: compiles faster
    return models.rnn_classifier("lstm", 16, 10)


def data(kind: str, seed: int = 0):
    rng = np.random.default_rng([seed, len(kind)])
    shape = SHAPES[kind]
    make = lambda n: {"x": rng.normal(size=(n,) + shape).astype(np.float32),
                      "y": rng.integers(0, 10, size=n).astype(np.int32)}
    return make(NUM_TRAIN), make(NUM_TEST)


# fsdp_tp: a 2 x 2 data x model mesh; the MLP's layers split Megatron-style by rules (the first's
# columns, the second's rows over 'model'), every other leaf by the automatic rule over 'data'
TP_RULES = [["dense_0/w$", ["", "model"]], ["dense_0/b$", ["model"]], ["dense_1/w$", ["model", ""]]]


def placement_for(mode: str, devices: int):
    if mode == "fsdp":  # every float leaf with a dimension divisible by the devices is split (tiny models)
        return make_placement("fsdp", devices, min_size=1)
    if mode == "fsdp_tp":
        return make_placement("fsdp", devices, min_size=1, model_devices=2, rules=TP_RULES)
    return make_placement(mode, devices)


def train(kind: str, mode: str, devices: int, k: int) -> dict:
    placement = placement_for(mode, devices)
    axis = getattr(placement, "axis_name", None)
    model = build(kind, axis)
    opt = optax.sgd(0.05, momentum=0.9)
    state = create_train_state(model, opt, jax.random.key(0), (1,) + SHAPES[kind])
    train_arrays, test_arrays = data(kind)
    loader = Loader(train_arrays, GLOBAL_BATCH, seed=1, drop_last=True, prefetch=0,
                    process_index=jax.process_index(), process_count=jax.process_count())
    eval_step = placement.compile_eval(make_eval_step(model, axis_name=axis))
    placed = {"calls": 0, "in_eval": 0}  # host placements: all, and while evaluating inside fit

    def eval_fn(s):  # as fundl.run.experiment's: the state fit holds, evaluated where it is
        before = placed["calls"]
        ev = evaluate(eval_step, *placement.eval_params(s), test_arrays, 16, placement=placement.for_eval())
        placed["in_eval"] += placed["calls"] - before
        return ev

    with counting_host_placements(placed):
        result = fit(state, make_train_step(model, opt, axis_name=axis), loader, num_steps=STEPS,
                     every=Every(log=5, eval=10), eval_fn=eval_fn, fusion=Fusion(steps_per_call=k), progress=False,
                     placement=placement)
    fit_evals = [r for r in result.history if r["split"] == "eval"]
    assert [r["step"] for r in fit_evals] == [10, 20], fit_evals
    # the returned plain state: eval_params places it from the host
    ev = evaluate(eval_step, *placement.eval_params(result.state), test_arrays, 16, placement=placement.for_eval())
    out = {f"state/{p}": v for p, v in flatten_state(result.state).items()}
    out["losses"] = np.array([r["loss"] for r in result.history if r["split"] == "train"])
    out["eval"] = np.array([ev["loss"], ev["accuracy"]])
    out["fit_eval"] = np.array([[r["loss"], r["accuracy"]] for r in fit_evals])
    out["eval_placed"] = np.array(placed["in_eval"])  # host -> device placements while evaluating in fit
    out["fit_placed"] = np.array(placed["calls"])  # ... in all of fit (put_state's, at least, on several devices)
    out["num_devices"] = np.array(placement.num_devices)
    # params + optimiser + model state: bytes on one device, bytes of one whole copy
    placed = placement.put_state(state)
    out["state_bytes"] = np.array(state_bytes(placed))
    if placement.splits_state:  # the spec of each leaf, as "path=spec" lines
        out["specs"] = np.array([f"{jax.tree_util.keystr(p, simple=True, separator='/')}={tuple(x.sharding.spec)}"
                                 for p, x in jax.tree_util.tree_flatten_with_path(placed)[0]])
    return out


def fsdp_memory() -> dict:
    """XLA's memory analysis of one train step of a wider MLP with Adam: replicated state
    (``sharding``) against FSDP, per device."""
    model, opt = models.mlp([512, 512], 10), optax.adam(1e-3)
    state = create_train_state(model, opt, jax.random.key(0), (1, 256))
    batch = {"x": np.zeros((64, 256), np.float32), "y": np.zeros(64, np.int32)}
    out = {}
    for mode in ("sharding", "fsdp"):
        placement = make_placement(mode)
        placed = placement.put_state(state)
        fn = placement.compile_train(make_train_step(model, opt))
        m = fn.lower(placed, placement.put_batch(batch)).compile().memory_analysis()
        out[f"{mode}/argument_bytes"] = np.array(m.argument_size_in_bytes)
        out[f"{mode}/output_bytes"] = np.array(m.output_size_in_bytes)
        out[f"{mode}/state_bytes"] = np.array(state_bytes(placed))
    out["batch_bytes"] = np.array(64 * 256 * 4 // jax.device_count() + 64 * 4 // jax.device_count())
    return out


@contextlib.contextmanager
def counting_host_placements(counter: dict):
    """Counts calls of ``fundl.train.placement.arrays.put`` (every copy of a state leaf onto the
    devices) in ``counter["calls"]``."""
    real = arrays.put

    def counted(*args, **kw):
        counter["calls"] += 1
        return real(*args, **kw)

    arrays.put = counted
    try:
        yield
    finally:
        arrays.put = real


def batch_norm_check() -> dict:
    """A pmapped batch norm (axis_name) vs one call on the global batch: outputs and running stats."""
    d = jax.local_device_count()
    layer_p, layer_1 = nn.batch_norm(axis_name="i"), nn.batch_norm()
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(8 * d, 5, 4)).astype(np.float32)
    params, state, _ = layer_1.init(jax.random.key(0), x.shape)
    y1, s1 = layer_1.apply(params, state, x, train=True)
    f = jax.pmap(lambda xs: layer_p.apply(params, state, xs, train=True), axis_name="i")
    yp, sp = f(x.reshape((d, 8) + x.shape[1:]))
    return {"y1": np.asarray(y1), "yp": np.asarray(yp).reshape(x.shape),
            "mean1": np.asarray(s1["mean"]), "meanp": np.asarray(sp["mean"][0]),
            "var1": np.asarray(s1["var"]), "varp": np.asarray(sp["var"][0]),
            "meanp_all": np.asarray(sp["mean"]), "num_devices": np.array(d)}


def main(argv) -> int:
    out_path, specs = argv[0], argv[1:]
    results = {}
    for spec in specs:
        if spec == "bn":
            results.update({f"bn/{k}": v for k, v in batch_norm_check().items()})
            continue
        if spec == "fsdp_memory":
            results.update({f"fsdp_memory/{k}": v for k, v in fsdp_memory().items()})
            continue
        mode, devices, k, kinds = (spec.split(":") + ["0", "1", "+".join(DEFAULT_KINDS)][len(spec.split(":")) - 1:])[:4]
        for kind in kinds.split("+"):
            t0 = time.perf_counter()
            results.update({f"{spec}/{kind}/{name}": v
                            for name, v in train(kind, mode, int(devices), int(k)).items()})
            print(f"{spec} {kind}: {time.perf_counter() - t0:.1f} s", flush=True)
    if jax.process_index() == 0:
        np.savez(out_path, **results)
    print(f"worker done: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.device_count()} devices", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
