#!/usr/bin/env python
"""Training-step throughput of fundl against Flax (Linen, NNX), Equinox, Haiku, stax and PyTorch.

    python scripts/benchmark.py [--out DIR] [--models mlp,cnn,lstm,...] [--impls fundl,linen,...]
                                [--rounds 5] [--slot 0.3] [--quick] [--unroll-study]
    python scripts/benchmark.py --end-to-end [--steps 600] [--rounds 2] [--configs ...] [--out DIR]

(``--end-to-end``: the shipped configs through the real ``fit``; see scripts/bench_end_to_end.py.)

Every implementation trains the same model with the same full step: forward,
softmax cross-entropy, backward, Adam (lr 1e-3), float32, batch 128, on one
fixed synthetic batch already in memory (no input pipeline is timed).  Each
is written the way its documentation recommends for speed: jitted steps with
the train state donated (``jax.jit(donate_argnums)``, ``eqx.filter_jit(donate=...)``,
the NNX split/merge functional API), ``OptimizedLSTMCell`` for Flax,
``nn.LSTM``/``nn.GRU`` and fused Adam for PyTorch with ``torch.set_num_threads``
= the number of cores.  A peer that cannot be imported is skipped.

Models (``--models``): ``mlp`` 784-128-10; ``cnn`` conv3x3 32 relu, avgpool 2,
conv3x3 64 relu, avgpool 2, dense 256 relu, dense 10 on 28x28x1; ``lstm`` 28
steps x 28 features, one LSTM layer of 128, dense 10 on the last hidden state;
and MNIST-1D-sized ones on length-40 sequences: ``mlp1d`` 40-100-100-10,
``cnn1d`` three conv k5 stride 2 of 25 channels + relu then dense 10,
``lstm1d``/``gru1d`` one layer of 128 over 40 steps x 1 feature, dense 10.

Implementations (``--impls``): ``fundl`` (``make_train_step``, jitted, state
donated), ``fundl_fused`` (``make_multi_step``: K = ``--steps-per-call``
optimiser steps per dispatch in one ``lax.scan``; unroll per model from
``FUSED_UNROLL``, chosen by measurement, see docs/benchmarks.md), ``fundl_sharded`` and ``fundl_sharded_fused``
(the same steps through fundl's ``sharding`` placement with the batch split
over the CPU cores, ``jax_num_cpu_devices`` = cores: on XLA:CPU two devices
keep two cores busier than one device's intra-op threads), ``linen``,
``nnx``, ``equinox``, ``haiku``, ``stax`` (no recurrent layers: n/a for
LSTM/GRU), ``torch`` (eager, ``torch.set_num_threads(cores)`` as PyTorch
recommends) and ``torch_1t`` (one thread: on a loaded machine PyTorch's
OpenMP pool of ``cores`` threads can collapse, so both are shown).

Method.  All implementations are built, compiled and warmed up; the *time to
first step* is measured from the start of building (model init included) to
the end of the first step (compile included), after one process-wide warm-up
so nobody pays for backend start-up.  Then ``--rounds`` rounds run every
implementation in turn (round-robin, the order rotated each round) for about
``--slot`` seconds each, blocking at the end of each slot; steps/s are
reported as the median, min and max over rounds, with the ratio to fundl
(per step) of the same round's median.  GFLOP/s use XLA's own FLOP count of
the fundl training step (``jit(...).lower(...).compile().cost_analysis()``;
recurrent models counted on a fully unrolled copy before optimisation,
since XLA counts a loop body once) for every implementation of that model, so they are throughput in
common units; %peak divides by the float32 matmul rate measured at start-up
(a jitted 2048x2048 ``jnp.dot``).  Memory is the peak resident-set growth of
a fresh process (Linux ``VmHWM``, reset after the imports) that builds the
implementation and runs 3 steps, compilation included (``--memory``,
on by default except with ``--quick``); JAX rows also give XLA's
``memory_analysis`` (arguments + outputs + temporaries - aliased) for the
step.

Output: a markdown table on stdout, and with ``--out DIR`` ``DIR/benchmark.json``
and ``DIR/benchmark.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 128
LR = 1e-3
ALL_MODELS = ["mlp", "cnn", "lstm", "mlp1d", "cnn1d", "lstm1d", "gru1d"]
ALL_IMPLS = ["fundl", "fundl_fused", "fundl_sharded", "fundl_sharded_fused", "linen", "nnx", "equinox", "haiku", "stax", "torch", "torch_1t"]
RECURRENT = {"lstm", "lstm1d", "gru1d"}

# Model specs.  ``x``: per-example input shape (channels last for JAX).
SPECS = {
    "mlp": dict(kind="mlp", x=(784,), hidden=[128]),
    "cnn": dict(kind="cnn", nd=2, x=(28, 28, 1), channels=[32, 64], k=3, stride=1, pool=True, hidden=[256]),
    "lstm": dict(kind="rnn", cell="lstm", x=(28, 28), units=128),
    "mlp1d": dict(kind="mlp", x=(40,), hidden=[100, 100]),
    "cnn1d": dict(kind="cnn", nd=1, x=(40, 1), channels=[25, 25, 25], k=5, stride=2, pool=False, hidden=[]),
    "lstm1d": dict(kind="rnn", cell="lstm", x=(40, 1), units=128),
    "gru1d": dict(kind="rnn", cell="gru", x=(40, 1), units=128),
}

# fundl_fused: lax.scan unroll per model, chosen by measurement on XLA:CPU
# (``--unroll-study`` times both; see docs/benchmarks.md).  True = fully unrolled.
# Measured (3 rounds, K=10, fused/per-step): rolled mlp 1.04, mlp1d 1.13, lstm 1.04,
# lstm1d 1.11, gru1d 0.98 vs unrolled 1.05, 1.03, 0.73, 0.75, 0.65; convolutions
# rolled 0.06 (cnn) and 0.15 (cnn1d) vs unrolled 1.15 and 0.99.
FUSED_UNROLL = {"mlp": 1, "cnn": True, "lstm": 1, "mlp1d": 1, "cnn1d": True, "lstm1d": 1, "gru1d": 1}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Implementations.  Each builder returns a Runner: ``step()`` dispatches one
# call (``steps_per_call`` optimiser steps), ``block()`` waits for the result.


class Runner:
    def __init__(self, step, block, steps_per_call=1, jitted=None, args=None, before=None):
        self.step, self.block, self.steps_per_call = step, block, steps_per_call
        self.jitted, self.args = jitted, args  # for XLA's memory analysis (JAX only)
        self.before = before  # e.g. torch.set_num_threads, process-wide

    def run(self, calls: int) -> None:
        if self.before is not None:
            self.before()
        for _ in range(calls):
            self.step()
        self.block()


def _data(spec, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH,) + tuple(spec["x"])).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    return x, y


def _ce(logits, y):
    import jax.numpy as jnp
    import optax
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _jax_runner(step_fn, state, x, y):
    """Drive ``state, loss = step_fn(state, x, y)`` (jitted, state donated)."""
    import jax
    box = {"state": state, "out": None}

    def step():
        box["state"], box["out"] = step_fn(box["state"], x, y)

    def block():
        jax.block_until_ready(box["out"])

    return Runner(step, block, jitted=step_fn, args=lambda: (box["state"], x, y))


def fundl_model(spec, unroll=1):
    from fundl import models, nn
    if spec["kind"] == "mlp":
        return models.mlp(spec["hidden"], 10)
    if spec["kind"] == "cnn":
        return models.cnn(spec["channels"], spec["hidden"], 10, kernel_size=spec["k"], stride=spec["stride"],
                          pool="avg" if spec["pool"] else "none", nd=spec["nd"])
    seq = (nn.lstm if spec["cell"] == "lstm" else nn.gru)(spec["units"], return_sequences=False, unroll=unroll)
    return nn.serial(nn.named(spec["cell"], seq), nn.dense(10), name="rnn_classifier")


def build_fundl(spec, fused=0, unroll=1):
    import jax
    import jax.numpy as jnp
    import optax
    from fundl.train.state import create_train_state
    from fundl.train.step import make_multi_step, make_train_step

    x, y = _data(spec)
    model = fundl_model(spec)
    opt = optax.adam(LR)
    state = create_train_state(model, opt, 0, (BATCH,) + tuple(spec["x"]))
    step = make_train_step(model, opt)
    if fused:
        fn = jax.jit(make_multi_step(step, unroll=unroll), donate_argnums=0)
        batch = {"x": jnp.broadcast_to(jnp.asarray(x), (fused,) + x.shape),
                 "y": jnp.broadcast_to(jnp.asarray(y), (fused,) + y.shape)}
    else:
        fn = jax.jit(step, donate_argnums=0)
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    box = {"state": state, "out": None}

    def run_step():
        box["state"], box["out"] = fn(box["state"], batch)

    def block():
        jax.block_until_ready(box["out"])

    return Runner(run_step, block, fused or 1, jitted=fn, args=lambda: (box["state"], batch))


def build_fundl_sharded(spec, fused=0, unroll=1):
    """fundl's ``sharding`` placement: the batch split over the CPU cores as XLA:CPU devices.

    Needs ``jax_num_cpu_devices`` = cores set before JAX starts (``main`` does
    it); syncs with the host every ``placement.sync_every`` dispatches, as the
    training loop does (queued collectives without a sync can deadlock).
    """
    import jax
    import numpy as np
    import optax
    from fundl.train.placement import make_placement
    from fundl.train.state import create_train_state
    from fundl.train.step import make_train_step

    if jax.local_device_count() < 2:
        return None
    x, y = _data(spec)
    model, opt = fundl_model(spec), optax.adam(LR)
    placement = make_placement("sharding", 0)
    state = placement.put_state(create_train_state(model, opt, 0, (BATCH,) + tuple(spec["x"])))
    fn = placement.compile_train(make_train_step(model, opt), fused or 1, 0 if unroll is True else unroll)
    if fused:
        batch = placement.put_batch({"x": np.stack([x] * fused), "y": np.stack([y] * fused)}, stacked=True)
    else:
        batch = placement.put_batch({"x": x, "y": y})
    box = {"state": state, "out": None, "n": 0}
    every = max(1, placement.sync_every or 1)

    def step():
        box["state"], box["out"] = fn(box["state"], batch)
        box["n"] += 1
        if box["n"] % every == 0:
            jax.block_until_ready(box["out"])

    def block():
        jax.block_until_ready(box["out"])

    return Runner(step, block, fused or 1, jitted=fn, args=lambda: (box["state"], batch))


def build_linen(spec):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            if spec["kind"] == "mlp":
                x = x.reshape(x.shape[0], -1)
                for h in spec["hidden"]:
                    x = nn.relu(nn.Dense(h)(x))
                return nn.Dense(10)(x)
            if spec["kind"] == "cnn":
                nd = spec["nd"]
                for c in spec["channels"]:
                    x = nn.relu(nn.Conv(c, (spec["k"],) * nd, strides=(spec["stride"],) * nd, padding="SAME")(x))
                    if spec["pool"]:
                        x = nn.avg_pool(x, (2,) * nd, strides=(2,) * nd)
                x = x.reshape(x.shape[0], -1)
                for h in spec["hidden"]:
                    x = nn.relu(nn.Dense(h)(x))
                return nn.Dense(10)(x)
            cell = nn.OptimizedLSTMCell(spec["units"]) if spec["cell"] == "lstm" else nn.GRUCell(spec["units"])
            ys = nn.RNN(cell)(x)
            return nn.Dense(10)(ys[:, -1])

    x, y = _data(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model, tx = Model(), optax.adam(LR)
    params = model.init(jax.random.key(0), x)["params"]
    state = (params, tx.init(params))

    def _step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: _ce(model.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(_step, donate_argnums=0)
    return _jax_runner(step, state, x, y)


def build_nnx(spec):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            in_shape = spec["x"]
            if spec["kind"] == "mlp":
                d, dense = in_shape[0], []
                for h in spec["hidden"]:
                    dense.append(nnx.Linear(d, h, rngs=rngs))
                    d = h
                self.dense = nnx.List(dense)
                self.out = nnx.Linear(d, 10, rngs=rngs)
            elif spec["kind"] == "cnn":
                nd, c_in, size = spec["nd"], in_shape[-1], list(in_shape[:-1])
                convs = []
                for c in spec["channels"]:
                    convs.append(nnx.Conv(c_in, c, (spec["k"],) * nd, strides=(spec["stride"],) * nd,
                                          padding="SAME", rngs=rngs))
                    c_in = c
                    size = [-(-s // spec["stride"]) for s in size]
                    if spec["pool"]:
                        size = [s // 2 for s in size]
                self.convs = nnx.List(convs)
                d = c_in
                for s in size:
                    d *= s
                dense = []
                for h in spec["hidden"]:
                    dense.append(nnx.Linear(d, h, rngs=rngs))
                    d = h
                self.dense = nnx.List(dense)
                self.out = nnx.Linear(d, 10, rngs=rngs)
            else:
                f = in_shape[-1]
                cell = (nnx.OptimizedLSTMCell(f, spec["units"], rngs=rngs) if spec["cell"] == "lstm"
                        else nnx.GRUCell(f, spec["units"], rngs=rngs))
                self.rnn = nnx.RNN(cell, rngs=rngs)
                self.out = nnx.Linear(spec["units"], 10, rngs=rngs)

        def __call__(self, x):
            if spec["kind"] == "rnn":
                return self.out(self.rnn(x)[:, -1])
            if spec["kind"] == "cnn":
                nd = spec["nd"]
                for conv in self.convs:
                    x = jax.nn.relu(conv(x))
                    if spec["pool"]:
                        x = nnx.avg_pool(x, (2,) * nd, strides=(2,) * nd)
            x = x.reshape(x.shape[0], -1)
            for d in self.dense:
                x = jax.nn.relu(d(x))
            return self.out(x)

    x, y = _data(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    # The functional API (split once, merge inside jax.jit) recommended by the
    # Flax docs ("Performance considerations") for the lowest overhead.
    def _step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: _ce(m(x), y))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    step = jax.jit(_step, donate_argnums=0)
    return _jax_runner(step, state, x, y)


def build_equinox(spec):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    key = jax.random.key(0)
    ks = list(jax.random.split(key, 8))

    class Model(eqx.Module):
        layers: list
        cell: eqx.Module | None
        out: eqx.nn.Linear

        def __init__(self):
            self.layers, self.cell = [], None
            if spec["kind"] == "mlp":
                d = spec["x"][0]
                for h in spec["hidden"]:
                    self.layers.append(eqx.nn.Linear(d, h, key=ks.pop()))
                    d = h
                self.out = eqx.nn.Linear(d, 10, key=ks.pop())
            elif spec["kind"] == "cnn":
                nd, c_in, size = spec["nd"], spec["x"][-1], list(spec["x"][:-1])
                conv = eqx.nn.Conv2d if nd == 2 else eqx.nn.Conv1d
                pool = eqx.nn.AvgPool2d if nd == 2 else eqx.nn.AvgPool1d
                for c in spec["channels"]:
                    k, s = spec["k"], spec["stride"]
                    self.layers.append(conv(c_in, c, k, stride=s, padding="SAME", key=ks.pop()))
                    c_in = c
                    size = [-(-n // s) for n in size]
                    if spec["pool"]:
                        self.layers.append(pool(2, 2))
                        size = [n // 2 for n in size]
                d = c_in
                for n in size:
                    d *= n
                self.layers.append(eqx.nn.Lambda(jnp.ravel))
                for h in spec["hidden"]:
                    self.layers.append(eqx.nn.Linear(d, h, key=ks.pop()))
                    d = h
                self.out = eqx.nn.Linear(d, 10, key=ks.pop())
            else:
                f = spec["x"][-1]
                cls = eqx.nn.LSTMCell if spec["cell"] == "lstm" else eqx.nn.GRUCell
                self.cell = cls(f, spec["units"], key=ks.pop())
                self.out = eqx.nn.Linear(spec["units"], 10, key=ks.pop())

        def __call__(self, x):  # one example, as Equinox layers expect (vmapped below)
            if self.cell is not None:
                h0 = jnp.zeros(spec["units"])
                carry0 = (h0, h0) if spec["cell"] == "lstm" else h0

                def body(carry, x_t):
                    return self.cell(x_t, carry), None

                carry, _ = jax.lax.scan(body, carry0, x)
                return self.out(carry[0] if spec["cell"] == "lstm" else carry)
            if spec["kind"] == "cnn":
                x = jnp.moveaxis(x, -1, 0)  # Equinox convolutions are channels-first
                for layer in self.layers:
                    x = layer(x)
                    if isinstance(layer, (eqx.nn.Conv1d, eqx.nn.Conv2d)):
                        x = jax.nn.relu(x)
                    elif isinstance(layer, eqx.nn.Linear):
                        x = jax.nn.relu(x)
                return self.out(x)
            for layer in self.layers:
                x = jax.nn.relu(layer(x))
            return self.out(x)

    x, y = _data(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model, tx = Model(), optax.adam(LR)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_value_and_grad
    def loss_fn(model, x, y):
        return _ce(jax.vmap(model)(x), y)

    # Batch first and not donated; model and optimiser state donated.
    @eqx.filter_jit(donate="all-except-first")
    def _step(batch, model, opt_state):
        x, y = batch
        loss, grads = loss_fn(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    box = {"m": model, "o": opt_state, "out": None}

    def step():
        box["m"], box["o"], box["out"] = _step((x, y), box["m"], box["o"])

    return Runner(step, lambda: jax.block_until_ready(box["out"]))


def build_haiku(spec):
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import optax

    def forward(x):
        if spec["kind"] == "mlp":
            x = x.reshape(x.shape[0], -1)
            for h in spec["hidden"]:
                x = jax.nn.relu(hk.Linear(h)(x))
            return hk.Linear(10)(x)
        if spec["kind"] == "cnn":
            nd = spec["nd"]
            conv = hk.Conv2D if nd == 2 else hk.Conv1D
            for c in spec["channels"]:
                x = jax.nn.relu(conv(c, spec["k"], stride=spec["stride"], padding="SAME")(x))
                if spec["pool"]:
                    w = (1,) + (2,) * nd + (1,)
                    x = hk.avg_pool(x, w, w, "VALID")
            x = hk.Flatten()(x)
            for h in spec["hidden"]:
                x = jax.nn.relu(hk.Linear(h)(x))
            return hk.Linear(10)(x)
        core = hk.LSTM(spec["units"]) if spec["cell"] == "lstm" else hk.GRU(spec["units"])
        ys, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0]))
        return hk.Linear(10)(ys[-1])

    net = hk.without_apply_rng(hk.transform(forward))
    x, y = _data(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    tx = optax.adam(LR)
    params = net.init(jax.random.key(0), x)
    state = (params, tx.init(params))

    def _step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: _ce(net.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return _jax_runner(jax.jit(_step, donate_argnums=0), state, x, y)


def build_stax(spec):
    import jax
    import jax.numpy as jnp
    import optax
    from jax.example_libraries import stax

    if spec["kind"] == "rnn":
        return None  # stax has no recurrent layers
    layers = []
    if spec["kind"] == "mlp":
        layers.append(stax.Flatten)
    else:
        nd = spec["nd"]
        dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NWC", "WIO", "NWC")
        for c in spec["channels"]:
            layers += [stax.GeneralConv(dn, c, (spec["k"],) * nd, (spec["stride"],) * nd, "SAME"), stax.Relu]
            if spec["pool"]:
                layers.append(stax.AvgPool((2,) * nd, (2,) * nd))
        layers.append(stax.Flatten)
    for h in spec["hidden"]:
        layers += [stax.Dense(h), stax.Relu]
    layers.append(stax.Dense(10))
    init_fn, apply_fn = stax.serial(*layers)
    x, y = _data(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    _, params = init_fn(jax.random.key(0), x.shape)
    tx = optax.adam(LR)
    state = (params, tx.init(params))

    def _step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: _ce(apply_fn(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return _jax_runner(jax.jit(_step, donate_argnums=0), state, x, y)


def build_torch(spec, threads=None):
    import torch
    from torch import nn

    threads = threads or _cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    xn, yn = _data(spec)
    if spec["kind"] == "mlp":
        layers, d = [nn.Flatten()], spec["x"][0]
        for h in spec["hidden"]:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        model = nn.Sequential(*layers, nn.Linear(d, 10))
    elif spec["kind"] == "cnn":
        nd = spec["nd"]
        conv, pool = (nn.Conv2d, nn.AvgPool2d) if nd == 2 else (nn.Conv1d, nn.AvgPool1d)
        layers, c_in, size = [], spec["x"][-1], list(spec["x"][:-1])
        k, s = spec["k"], spec["stride"]
        for c in spec["channels"]:
            layers += [conv(c_in, c, k, stride=s, padding=k // 2), nn.ReLU()]
            c_in, size = c, [(n + 2 * (k // 2) - k) // s + 1 for n in size]
            if spec["pool"]:
                layers.append(pool(2))
                size = [n // 2 for n in size]
        d = c_in
        for n in size:
            d *= n
        layers.append(nn.Flatten())
        for h in spec["hidden"]:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        model = nn.Sequential(*layers, nn.Linear(d, 10))
        xn = xn.transpose((0, xn.ndim - 1) + tuple(range(1, xn.ndim - 1)))  # channels first (NCHW)
    else:
        rnn_cls = nn.LSTM if spec["cell"] == "lstm" else nn.GRU

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = rnn_cls(spec["x"][-1], spec["units"], batch_first=True)
                self.out = nn.Linear(spec["units"], 10)

            def forward(self, x):
                ys, _ = self.rnn(x)
                return self.out(ys[:, -1])

        model = Model()
    x, y = torch.from_numpy(xn.copy()), torch.from_numpy(yn.astype("int64"))
    try:
        opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return Runner(step, lambda: None, before=lambda: torch.set_num_threads(threads))


def build(impl: str, spec: dict, model_name: str, steps_per_call: int):
    if impl == "fundl":
        return build_fundl(spec)
    if impl == "fundl_fused":
        return build_fundl(spec, fused=steps_per_call, unroll=FUSED_UNROLL[model_name])
    if impl == "fundl_sharded":
        return build_fundl_sharded(spec)
    if impl == "fundl_sharded_fused":
        return build_fundl_sharded(spec, fused=steps_per_call, unroll=FUSED_UNROLL[model_name])
    if impl.startswith("fundl_fused_"):  # unroll study: fundl_fused_rolled / fundl_fused_unrolled
        return build_fundl(spec, fused=steps_per_call, unroll=1 if impl.endswith("_rolled") else True)
    if impl == "torch_1t":
        return build_torch(spec, threads=1)
    return {"linen": build_linen, "nnx": build_nnx, "equinox": build_equinox, "haiku": build_haiku,
            "stax": build_stax, "torch": build_torch}[impl](spec)


IMPORTS = {"linen": "flax.linen", "nnx": "flax.nnx", "equinox": "equinox", "haiku": "haiku",
           "stax": "jax.example_libraries.stax", "torch": "torch", "torch_1t": "torch"}


def available(impl: str) -> str | None:
    """None when importable, else the reason."""
    mod = IMPORTS.get(impl)
    if mod is None:
        return None
    try:
        __import__(mod)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure skips the peer
        return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------
# Measurements


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """float32 matmul rate of this machine through XLA, GFLOP/s (median of ``reps``)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def model_flops(spec) -> float | None:
    """XLA's FLOP count of one fundl training step (recurrent models fully unrolled)."""
    import jax
    import jax.numpy as jnp
    import optax
    from fundl.train.state import create_train_state
    from fundl.train.step import make_train_step

    unroll = spec["x"][0] if spec["kind"] == "rnn" else 1
    model = fundl_model(spec, unroll=unroll)
    opt = optax.adam(LR)
    state = create_train_state(model, opt, 0, (BATCH,) + tuple(spec["x"]))
    x, y = _data(spec)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    try:
        lowered = jax.jit(make_train_step(model, opt)).lower(state, batch)
        # Compiling a fully unrolled recurrent step takes ~30 s: count those before XLA's passes.
        cost = lowered.cost_analysis() if unroll > 1 else lowered.compile().cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # noqa: BLE001
        return None


def xla_memory_bytes(runner) -> int | None:
    """Arguments + outputs + temporaries - aliased bytes of the compiled step (JAX only)."""
    if runner.jitted is None or not hasattr(runner.jitted, "lower"):
        return None
    try:
        m = runner.jitted.lower(*runner.args()).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: ``clear_refs`` 5) and return the RSS in KiB.

    Without it the peak would still hold the high-water mark of the imports.
    Elsewhere falls back to ``ru_maxrss``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def probe(model_name: str, impl: str, steps_per_call: int) -> dict:
    """Run in a fresh process: peak RSS growth and time to first step, cold."""
    spec = SPECS[model_name]
    mod = IMPORTS.get(impl)
    import jax
    import jax.numpy as jnp
    if mod:
        __import__(mod)
    (jnp.ones(3) + 1).block_until_ready()  # backend start-up is not the model's cost
    _data(spec)
    base = _reset_peak_rss()
    t0 = time.perf_counter()
    runner = build(impl, spec, model_name, steps_per_call)
    runner.run(1)
    first = time.perf_counter() - t0
    runner.run(2)
    return {"peak_rss_mib": (_peak_rss_kib() - base) / 1024, "first_step_s_cold": first}


def run_probe_subprocess(model_name, impl, steps_per_call) -> dict | None:
    cmd = [sys.executable, __file__, "--_probe", f"{model_name}:{impl}", "--steps-per-call", str(steps_per_call)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
        for line in out.stdout.splitlines()[::-1]:
            if line.startswith("{"):
                return json.loads(line)
    except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError):
        pass
    return None


def versions() -> dict:
    from importlib import metadata
    v = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "optax", "equinox", "dm-haiku", "torch", "numpy"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return v


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------
# The run


def _fmt_mib(b):
    return "" if b is None else f"{b / 2**20:.1f}"


def markdown(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores; float32 matmul peak (XLA, 2048²): "
                 f"{m['matmul_peak_gflops']:.0f} GFLOP/s; load average at start {m['load_start']}, "
                 f"end {m['load_end']}; XLA_FLAGS={m['xla_flags']!r}; "
                 f"GLIBC_TUNABLES={m.get('glibc_tunables', '')!r} (fundl/run/hugepages.py)")
    lines.append(f"Batch {BATCH}, float32, Adam; {result['rounds']} interleaved rounds of ~{result['slot_s']} s "
                 f"per implementation; fused K={result['steps_per_call']}.")
    lines.append("")
    lines.append("| model | impl | steps/s median | min | max | × fundl | GFLOP/s | % peak "
                 "| first step s | peak RSS MiB | XLA mem MiB |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model_name, rows in result["models"].items():
        for impl, r in rows.items():
            if "skipped" in r:
                lines.append(f"| {model_name} | {impl} | n/a ({r['skipped']}) | | | | | | | | |")
                continue
            first = r.get("first_step_s_cold", r["first_step_s"])
            gf = "" if r.get("gflops") is None else f"{r['gflops']:.1f}"
            pk = "" if r.get("pct_peak") is None else f"{r['pct_peak']:.1f}"
            rss = "" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
            lines.append(
                f"| {model_name} | {impl} | {r['steps_per_s']:.0f} | {r['min']:.0f} | {r['max']:.0f} "
                f"| {r['ratio_to_fundl']:.2f} | {gf} | {pk} | {first:.2f} | {rss} "
                f"| {_fmt_mib(r.get('xla_memory_bytes'))} |")
    lines += ["", "First step: build + compile + first step, in a fresh process when memory probes ran "
              "(else in the benchmark process).", ""]
    lines += targets_markdown(result)
    return "\n".join(lines)


PEERS_JAX = ("linen", "nnx", "equinox", "haiku", "stax")
PEERS = PEERS_JAX + ("torch", "torch_1t")


def targets(result: dict) -> dict:
    """The issue's targets as ratios of per-round medians (> 1: fundl faster)."""
    out = {}
    for m, rows in result["models"].items():
        def med(i):
            return rows.get(i, {}).get("ratio_to_fundl")  # impl / fundl
        best = lambda names: max((med(i), i) for i in names if med(i) is not None) if any(  # noqa: E731
            med(i) is not None for i in names) else None
        t = {}
        bp, bj, bt = best(PEERS), best(PEERS_JAX), best(("torch", "torch_1t"))
        if bp:
            t["fundl_vs_best_peer"] = (1 / bp[0], bp[1])
            if med("fundl_fused") is not None:
                t["fused_vs_best_peer"] = (med("fundl_fused") / bp[0], bp[1])
        if bj:
            t["fundl_vs_best_jax_peer"] = (1 / bj[0], bj[1])
        if bt:
            t["fundl_vs_best_torch"] = (1 / bt[0], bt[1])
            if med("fundl_fused") is not None:
                t["fused_vs_best_torch"] = (med("fundl_fused") / bt[0], bt[1])
        variants = [i for i in ("fundl_fused", "fundl_sharded", "fundl_sharded_fused") if med(i) is not None]
        if variants:
            top = max(variants, key=med)
            for name, ref in (("best_fundl_vs_best_peer", bp), ("best_fundl_vs_best_torch", bt)):
                if ref and med(top) > 1:
                    t[name] = (med(top) / ref[0], f"{top} vs {ref[1]}")
        if "stax" in rows and "steps_per_s" in rows["stax"] and "steps_per_s" in rows.get("fundl", {}):
            key = "first_step_s_cold" if "first_step_s_cold" in rows["fundl"] else "first_step_s"
            t["first_step_fundl_over_stax"] = (rows["fundl"].get(key) / rows["stax"].get(key, float("nan")), "stax")
        out[m] = t
    return out


def targets_markdown(result: dict) -> list[str]:
    lines = ["| model | fundl / best peer | fused / best peer | fundl / best JAX peer | fundl / best torch "
             "| fused / best torch | best fundl variant / best peer | first step fundl / stax |",
             "|---|---|---|---|---|---|---|---|"]
    for m, t in result.get("targets", {}).items():
        def c(k):
            return f"{t[k][0]:.2f} ({t[k][1]})" if k in t else ""
        lines.append(f"| {m} | {c('fundl_vs_best_peer')} | {c('fused_vs_best_peer')} | {c('fundl_vs_best_jax_peer')} "
                     f"| {c('fundl_vs_best_torch')} | {c('fused_vs_best_torch')} | {c('best_fundl_vs_best_peer')} "
                     f"| {c('first_step_fundl_over_stax')} |")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--end-to-end" in argv:  # its own flags (scripts/bench_end_to_end.py)
        import bench_end_to_end

        return bench_end_to_end.main([a for a in argv if a != "--end-to-end"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--impls", default=",".join(ALL_IMPLS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--slot", type=float, default=0.3, help="seconds per implementation per round")
    p.add_argument("--steps-per-call", type=int, default=10, help="K for fundl_fused")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: mlp and cnn1d only, 1 round, tiny slots, no memory probes")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak RSS and cold first step from a fresh process per implementation")
    p.add_argument("--unroll-study", action="store_true",
                   help="also time fundl fused with a rolled and a fully unrolled scan")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--render", type=Path, default=None,
                   help="re-render the tables of an earlier benchmark.json (to --out) without running")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--end-to-end", action="store_true",
                   help="every shipped config through the real fit beside its bare step and a hand-written "
                        "loop (scripts/bench_end_to_end.py, which takes the flags that follow)")
    args = p.parse_args(argv)

    if args.render:
        result = json.loads(args.render.read_text())
        result["targets"] = targets(result)
        md = markdown(result)
        print(md)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "benchmark.md").write_text(md + "\n")
        return 0

    if any(i.startswith("fundl_sharded") for i in args.impls.split(",")) or args._probe:
        # The cores as XLA:CPU devices for the sharded rows; other rows use device 0 as usual.
        import jax
        jax.config.update("jax_num_cpu_devices", _cpu_count())

    if args._probe:
        model_name, impl = args._probe.split(":")
        print(json.dumps(probe(model_name, impl, args.steps_per_call)))
        return 0

    if args.quick:
        if args.models == ",".join(ALL_MODELS):
            args.models = "mlp,cnn1d"
        args.rounds, args.slot = 1, 0.05
    memory = (not args.quick) if args.memory is None else args.memory
    models = [m for m in args.models.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    if args.unroll_study:
        impls += ["fundl_fused_rolled", "fundl_fused_unrolled"]
    for m in models:
        if m not in SPECS:
            p.error(f"unknown model {m!r}; choose from {ALL_MODELS}")
    for i in impls:
        if i not in ALL_IMPLS and not i.startswith("fundl_fused_"):
            p.error(f"unknown implementation {i!r}; choose from {ALL_IMPLS}")

    import jax
    import jax.numpy as jnp

    t_start = time.perf_counter()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    (jnp.ones(3) + 1).block_until_ready()
    skipped = {i: available(i) for i in impls}
    for i, why in skipped.items():
        if why:
            print(f"skipping {i}: {why}", file=sys.stderr)
    if "torch" in impls and not skipped["torch"]:
        import torch
        torch.set_num_threads(_cpu_count())
        torch.ones(2) + 1
    peak = matmul_peak_gflops(1024 if args.quick else 2048)

    # Build, compile and warm up everything; time to first step in-process.
    runners, results = {}, {}
    for m in models:
        spec = SPECS[m]
        results[m] = {}
        flops = model_flops(spec)
        for i in impls:
            if skipped[i]:
                results[m][i] = {"skipped": "not importable"}
                continue
            t0 = time.perf_counter()
            r = build(i, spec, m, args.steps_per_call)
            if r is None:
                why = "one CPU device" if i.startswith("fundl_sharded") else (
                    "no recurrent layers" if spec["kind"] == "rnn" else "unsupported")
                results[m][i] = {"skipped": why}
                continue
            r.run(1)
            first = time.perf_counter() - t0
            r.run(2)  # warm-up
            # Calls per slot, calibrated on a short run.
            t = time.perf_counter()
            r.run(3)
            per_call = (time.perf_counter() - t) / 3
            r.calls = max(1, round(args.slot / max(per_call, 1e-6)))
            runners[(m, i)] = r
            results[m][i] = {"first_step_s": first, "flops_per_step": flops,
                             "xla_memory_bytes": xla_memory_bytes(r), "steps_per_call": r.steps_per_call,
                             "calls_per_slot": r.calls}
            print(f"built {m}/{i}: first step {first:.2f} s", file=sys.stderr)

    # Interleaved rounds: every implementation of a model in turn, order rotated.
    keys = list(runners)
    rates = {k: [] for k in keys}
    for rnd in range(args.rounds):
        order = keys[rnd % len(keys):] + keys[:rnd % len(keys)] if keys else []
        for k in order:
            r = runners[k]
            t = time.perf_counter()
            r.run(r.calls)
            rates[k].append(r.calls * r.steps_per_call / (time.perf_counter() - t))

    for (m, i), rs in rates.items():
        row = results[m][i]
        row.update(steps_per_s=statistics.median(rs), min=min(rs), max=max(rs), rounds=rs)
        if row["flops_per_step"]:
            row["gflops"] = row["steps_per_s"] * row["flops_per_step"] / 1e9
            row["pct_peak"] = 100 * row["gflops"] / peak
    for m in models:
        base = results[m].get("fundl", {}).get("rounds")
        for i, row in results[m].items():
            if "rounds" in row and base:
                # Ratio of medians of per-round ratios: drift within a round hits both alike.
                row["ratio_to_fundl"] = statistics.median(a / b for a, b in zip(row["rounds"], base))
            elif "rounds" in row:
                row["ratio_to_fundl"] = float("nan")
    del runners

    if memory:
        for m in models:
            for i, row in results[m].items():
                if "rounds" not in row:
                    continue
                pr = run_probe_subprocess(m, i, args.steps_per_call)
                if pr:
                    row.update(pr)
                    print(f"probed {m}/{i}: {pr}", file=sys.stderr)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": _cpu_count(), "matmul_peak_gflops": peak,
                    "load_start": load_start, "load_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "platform": platform.platform(),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "versions": versions(),
        "batch": BATCH, "rounds": args.rounds, "slot_s": args.slot, "steps_per_call": args.steps_per_call,
        "fused_unroll": {m: FUSED_UNROLL[m] for m in models},
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "models": results,
        "wall_s": None,
    }
    result["targets"] = targets(result)
    result["wall_s"] = time.perf_counter() - t_start
    md = markdown(result)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / "benchmark.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
