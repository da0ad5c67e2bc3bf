"""The same training step in fundl and in each peer library, for ``benchmarks.benchmark``.

Every implementation trains the same model with the same full step: forward, softmax
cross-entropy, backward, Adam (lr 1e-3), float32, batch 128, on one fixed synthetic batch
already in memory (no input pipeline is timed).  Each is written the way its documentation
recommends for speed: jitted steps with the train state donated (``jax.jit(donate_argnums)``,
``eqx.filter_jit(donate=...)``, the NNX split/merge functional API), ``OptimizedLSTMCell`` for
Flax, ``nn.LSTM``/``nn.GRU`` and fused Adam for PyTorch with ``torch.set_num_threads`` = the
number of cores.  ``available(impl)`` says why a peer cannot be imported (it is then skipped).

Models (``SPECS``): ``mlp`` 784-128-10; ``cnn`` conv3x3 32 relu, avgpool 2, conv3x3 64 relu,
avgpool 2, dense 256 relu, dense 10 on 28x28x1; ``lstm`` 28 steps x 28 features, one LSTM layer
of 128, dense 10 on the last hidden state; and MNIST-1D-sized ones on length-40 sequences:
``mlp1d`` 40-100-100-10, ``cnn1d`` three conv k5 stride 2 of 25 channels + relu then dense 10,
``lstm1d``/``gru1d`` one layer of 128 over 40 steps x 1 feature, dense 10.

Implementations (``ALL_IMPLS``; ``build(impl, ...)`` returns a ``Runner``):

* ``fundl`` (``make_train_step``, jitted, state donated);
* ``fundl_fused`` (``make_multi_step``: K optimiser steps per dispatch in one ``lax.scan``;
  unroll per model from ``FUSED_UNROLL``); ``fundl_fused_rolled`` / ``fundl_fused_unrolled``
  (the unroll study: both settings on every model);
* ``fundl_sharded`` and ``fundl_sharded_fused`` (the same steps through fundl's ``sharding``
  placement, the batch split over the CPU cores as XLA:CPU devices);
* ``fundl_loss_only`` (``make_train_step(metrics_fn=no_metrics)``) and ``fundl_tuple`` (fundl's
  model in a stax-style step: a ``(params, opt_state)`` tuple, loss only): what parts of
  fundl's step cost beside stax's;
* ``linen``, ``nnx``, ``equinox``, ``haiku``, ``stax`` (no recurrent layers: ``None`` for
  LSTM/GRU), ``torch`` (eager, ``torch.set_num_threads(cores)`` as PyTorch recommends) and
  ``torch_1t`` (one thread: on a loaded machine PyTorch's OpenMP pool of ``cores`` threads can
  collapse, so both are shown).
"""

from __future__ import annotations

from benchmarks.harness import cpu_count

BATCH = 128
LR = 1e-3
ALL_MODELS = ["mlp", "cnn", "lstm", "mlp1d", "cnn1d", "lstm1d", "gru1d"]
ALL_IMPLS = ["fundl", "fundl_fused", "fundl_sharded", "fundl_sharded_fused", "fundl_loss_only", "fundl_tuple",
             "linen", "nnx", "equinox", "haiku", "stax", "torch", "torch_1t"]
DEFAULT_IMPLS = ["fundl", "fundl_fused", "fundl_sharded", "fundl_sharded_fused", "linen", "nnx", "equinox",
                 "haiku", "stax", "torch", "torch_1t"]
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

# fundl_fused: lax.scan unroll per model, chosen by measurement on XLA:CPU (True = fully unrolled):
# a rolled scan over convolution steps is slow there, unrolled recurrent steps too.
# ``python -m benchmarks.benchmark --unroll-study`` times both; the figures: docs/benchmarks.md, "Fused steps".
FUSED_UNROLL = {"mlp": 1, "cnn": True, "lstm": 1, "mlp1d": 1, "cnn1d": True, "lstm1d": 1, "gru1d": 1}


# ---------------------------------------------------------------------------
# Implementations.  Each builder returns a Runner: ``step()`` dispatches one
# call (``steps_per_call`` optimiser steps), ``block()`` waits for the result.


class Runner:
    """One implementation's step, ready to run: ``run(calls)`` dispatches ``calls`` calls of
    ``steps_per_call`` optimiser steps each and waits for the last."""

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

    def xla_memory_bytes(self) -> int | None:
        """Arguments + outputs + temporaries - aliased bytes of the compiled step (JAX only)."""
        if self.jitted is None or not hasattr(self.jitted, "lower"):
            return None
        try:
            m = self.jitted.lower(*self.args()).compile().memory_analysis()
            return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                       - m.alias_size_in_bytes)
        except Exception:  # noqa: BLE001
            return None


def synthetic_batch(spec, seed=0):
    """One fixed batch of ``BATCH`` normal inputs of the model's shape and random labels of 10 classes."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH,) + tuple(spec["x"])).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    return x, y


def cross_entropy(logits, y):
    """The mean softmax cross-entropy every JAX implementation minimises."""
    import jax.numpy as jnp
    import optax
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def jax_runner(step_fn, state, *args, steps_per_call=1, sync_every=0):
    """Drive ``state, out = step_fn(state, *args)`` (jitted, state donated); ``sync_every``: wait for
    the device every that many calls, as fundl's loop does under multi-device placements."""
    import jax
    box = {"state": state, "out": None, "n": 0}

    def step():
        box["state"], box["out"] = step_fn(box["state"], *args)
        box["n"] += 1
        if sync_every and box["n"] % sync_every == 0:
            jax.block_until_ready(box["out"])

    def block():
        jax.block_until_ready(box["out"])

    return Runner(step, block, steps_per_call, jitted=step_fn, args=lambda: (box["state"], *args))


def fundl_model(spec, unroll=1):
    """The spec's model built from fundl's layers (``unroll``: the recurrent scan's)."""
    from fundl import models, nn
    if spec["kind"] == "mlp":
        return models.mlp(spec["hidden"], 10)
    if spec["kind"] == "cnn":
        return models.cnn(spec["channels"], spec["hidden"], 10, kernel_size=spec["k"], stride=spec["stride"],
                          pool="avg" if spec["pool"] else "none", nd=spec["nd"])
    seq = (nn.lstm if spec["cell"] == "lstm" else nn.gru)(spec["units"], return_sequences=False, unroll=unroll)
    return nn.serial(nn.named(spec["cell"], seq), nn.dense(10), name="rnn_classifier")


def build_fundl(spec, fused=0, unroll=1, **step_options):
    """fundl's step (``make_train_step(model, opt, **step_options)``), jitted with the state donated;
    ``fused``: that many steps per dispatch (``make_multi_step``)."""
    import jax
    import jax.numpy as jnp
    import optax
    from fundl.train.state import create_train_state
    from fundl.train.fusion import make_multi_step
    from fundl.train.step import make_train_step

    x, y = synthetic_batch(spec)
    model = fundl_model(spec)
    opt = optax.adam(LR)
    state = create_train_state(model, opt, 0, (BATCH,) + tuple(spec["x"]))
    step = make_train_step(model, opt, **step_options)
    if fused:
        fn = jax.jit(make_multi_step(step, unroll=unroll), donate_argnums=0)
        batch = {"x": jnp.broadcast_to(jnp.asarray(x), (fused,) + x.shape),
                 "y": jnp.broadcast_to(jnp.asarray(y), (fused,) + y.shape)}
    else:
        fn = jax.jit(step, donate_argnums=0)
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    return jax_runner(fn, state, batch, steps_per_call=fused or 1)


def build_fundl_tuple(spec):
    """fundl's model in a stax-style step: a ``(params, opt_state)`` tuple, loss only, no metrics,
    no step counter or key (what fundl's ``TrainState`` and metrics cost beside stax's step)."""
    import jax
    import jax.numpy as jnp
    import optax

    x, y = (jnp.asarray(a) for a in synthetic_batch(spec))
    model, opt = fundl_model(spec), optax.adam(LR)
    params, model_state, _ = model.init(jax.random.key(0), (BATCH,) + tuple(spec["x"]))

    def step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(model.apply(p, model_state, x, train=True)[0], y))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax_runner(jax.jit(step, donate_argnums=0), (params, opt.init(params)), x, y)


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
    x, y = synthetic_batch(spec)
    model, opt = fundl_model(spec), optax.adam(LR)
    placement = make_placement("sharding", 0)
    state = placement.put_state(create_train_state(model, opt, 0, (BATCH,) + tuple(spec["x"])))
    fn = placement.compile_train(make_train_step(model, opt), fused or 1, 0 if unroll is True else unroll)
    if fused:
        batch = placement.put_batch({"x": np.stack([x] * fused), "y": np.stack([y] * fused)}, stacked=True)
    else:
        batch = placement.put_batch({"x": x, "y": y})
    return jax_runner(fn, state, batch, steps_per_call=fused or 1, sync_every=max(1, placement.sync_every or 1))


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

    x, y = synthetic_batch(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model, tx = Model(), optax.adam(LR)
    params = model.init(jax.random.key(0), x)["params"]
    state = (params, tx.init(params))

    def _step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(_step, donate_argnums=0)
    return jax_runner(step, state, x, y)


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

    x, y = synthetic_batch(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    # The functional API (split once, merge inside jax.jit) recommended by the
    # Flax docs ("Performance considerations") for the lowest overhead.
    def _step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    step = jax.jit(_step, donate_argnums=0)
    return jax_runner(step, state, x, y)


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

    x, y = synthetic_batch(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model, tx = Model(), optax.adam(LR)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_value_and_grad
    def loss_fn(model, x, y):
        return cross_entropy(jax.vmap(model)(x), y)

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
    x, y = synthetic_batch(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    tx = optax.adam(LR)
    params = net.init(jax.random.key(0), x)
    state = (params, tx.init(params))

    def _step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(net.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax_runner(jax.jit(_step, donate_argnums=0), state, x, y)


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
    x, y = synthetic_batch(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    _, params = init_fn(jax.random.key(0), x.shape)
    tx = optax.adam(LR)
    state = (params, tx.init(params))

    def _step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply_fn(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax_runner(jax.jit(_step, donate_argnums=0), state, x, y)


def build_torch(spec, threads=None):
    import torch
    from torch import nn

    threads = threads or cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    xn, yn = synthetic_batch(spec)
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
    """A warmed-up-to-be ``Runner`` of ``impl`` for the model ``SPECS[model_name]``, or None where
    that implementation cannot express the model (stax has no recurrent layers; the sharded rows
    need two CPU devices)."""
    if impl == "fundl":
        return build_fundl(spec)
    if impl == "fundl_loss_only":
        from fundl.metrics import no_metrics

        return build_fundl(spec, metrics_fn=no_metrics)
    if impl == "fundl_tuple":
        return build_fundl_tuple(spec)
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

# What each implementation's builder imports besides its library (IMPORTS): a first-step probe
# imports these before its clock starts, as it does the library (``library_modules``).
BUILDER_IMPORTS = {"jax": ("optax",),
                   "fundl": ("optax", "fundl.models", "fundl.nn", "fundl.train.state", "fundl.train.step",
                             "fundl.train.fusion", "fundl.train.placement")}


def library_modules(impl: str) -> tuple[str, ...]:
    """Every module ``build(impl, ...)`` imports: the library and what its builder uses (optax)."""
    if impl.startswith("fundl"):
        return BUILDER_IMPORTS["fundl"]
    if impl.startswith("torch"):
        return (IMPORTS[impl],)
    return (IMPORTS[impl],) + BUILDER_IMPORTS["jax"]


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


