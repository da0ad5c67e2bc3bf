"""Rematerialisation: layers whose activations are recomputed in the backward pass.

``remat(layer)`` is ``layer`` with its ``apply`` recomputed under ``grad``:
the forward pass keeps only the layer's *inputs* (params, state, ``x``,
``key``) instead of every intermediate its backward pass needs, and the
backward pass runs the layer's forward again to rebuild them.  Peak memory
falls by what the layer's intermediates took; each step pays about one more
forward pass of the wrapped layers.  ``init`` is the wrapped layer's, so
params, state, names and ``nn.summary`` are unchanged; values and gradients
are those of the plain layer (the same operations run; ``tests/test_remat.py``
says how exactly they agree).  ``train`` is a Python bool closed over (never
traced); ``key`` is an argument, so the recomputed dropout masks equal the
forward pass's.

Two mechanisms, because XLA:CPU undoes the usual one (measured,
docs/transforms.md "Rematerialisation"):

* ``mode="checkpoint"`` (default): ``jax.checkpoint``.  Composes with every
  transform (``jvp`` too) and policies.  JAX keeps XLA from merging the
  recomputation with the forward pass (CSE) by an ``optimization_barrier``;
  XLA:CPU removes those barriers early in its pipeline and a later CSE
  merges the two, so under ``jit`` on CPU the compiled program is the plain
  one (same HLO, same memory).  It works inside loop bodies (``lax.scan``:
  see :func:`remat_cell` and ``fundl.transforms.through_training``), and on
  backends that keep the barrier until scheduling.
* ``mode="custom_vjp"``: a ``jax.custom_vjp`` whose backward rule recomputes
  the layer from inputs made to depend on the incoming cotangent (plus an
  exact zero XLA cannot fold away), so the recomputation can neither be
  merged with the forward pass nor scheduled before the backward pass reaches
  the layer.  Works on every backend, XLA:CPU included; reverse mode only
  (``jax.jvp``/``jacfwd`` through it raise JAX's custom_vjp error).

``remat_cell(cell)`` checkpoints a recurrent cell's step inside the time
scan: the scan then keeps only the carry per step (the LSTM's ``h, c``)
instead of every gate, a much smaller residual for a long-sequence LSTM, on
every backend (measured in docs/transforms.md, "Rematerialisation").
``remat_serial(*parts)`` is ``nn.serial`` with runs of layers recomputed as
blocks and the params, names and keys of ``nn.serial``.
``compiled_memory(fn, *args)`` reads XLA's memory analysis.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from fundl.nn.children import apply_child, check_children, child_key, child_names, put_nonempty
from fundl.nn.combinators import serial
from fundl.nn.core import Layer

MODES = ("checkpoint", "custom_vjp")


def _float_leaves(tree):
    return [a for a in jax.tree.leaves(tree)
            if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) and a.size]


def _tie(tree, zero):
    """``tree`` plus ``zero`` (an exact 0 computed from the cotangent), leaf by leaf; PRNG keys through
    their key data.  The values do not change; the data dependence orders the recomputation after
    the cotangent and makes it distinct from the forward pass for XLA."""
    def tie(a):
        if not hasattr(a, "dtype"):
            return a
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(a)
            return jax.random.wrap_key_data(data + zero.astype(data.dtype), impl=jax.random.key_impl(a))
        return a + zero.astype(a.dtype)

    return jax.tree.map(tie, tree)


def _recompute_after_cotangent(fn: Callable) -> Callable:
    """``fn(params, state, x, key)`` whose reverse-mode rule keeps the inputs and recomputes ``fn``
    when the cotangent arrives (``mode="custom_vjp"``)."""

    @jax.custom_vjp
    def f(params, state, x, key):
        return fn(params, state, x, key)

    def fwd(params, state, x, key):
        return fn(params, state, x, key), (params, state, x, key)

    def bwd(res, ct):
        params, state, x, key = res
        cts = _float_leaves(ct)
        if cts:
            c = cts[0].ravel()[0]
            zero = jnp.where(jnp.isfinite(c), c * 0, jnp.zeros((), c.dtype))  # 0; XLA cannot know
            x, key = _tie((x, key), zero)
        _, vjp = jax.vjp(lambda p, s, x: fn(p, s, x, key), params, state, x)
        return (*vjp(ct), None)

    f.defvjp(fwd, bwd)
    return f


def _wrap(run: Callable, mode: str, policy, prevent_cse: bool) -> Callable:
    if mode == "checkpoint":
        return jax.checkpoint(run, policy=policy, prevent_cse=prevent_cse)
    if policy is not None:
        raise ValueError("remat: a checkpoint policy needs mode='checkpoint' (custom_vjp keeps only the inputs)")
    return _recompute_after_cotangent(run)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"remat mode must be one of {MODES}, got {mode!r}")


def remat(layer: Layer, *, mode: str = "checkpoint", policy: Callable | None = None,
          prevent_cse: bool = True) -> Layer:
    """``layer`` recomputed in the backward pass; ``init``, name and params unchanged.

    ``mode``: ``"checkpoint"`` (``jax.checkpoint``; undone by XLA:CPU under
    ``jit``, see the module docstring) or ``"custom_vjp"`` (effective on every
    backend, reverse mode only).  ``policy`` (checkpoint mode): a
    ``jax.checkpoint_policies`` entry choosing intermediates to keep after all;
    None keeps none.  ``prevent_cse`` as in ``jax.checkpoint``.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"remat expects a fundl Layer, got {type(layer).__name__}: {layer!r}")
    _check_mode(mode)

    def apply(params, state, x, *, key=None, train=False):
        train = bool(train)  # static: closed over, so branches on it are not traced

        def run(params, state, x, key):
            return layer.apply(params, state, x, key=key, train=train)

        return _wrap(run, mode, policy, prevent_cse)(params, state, x, key)

    return layer._replace(apply=apply)


def remat_serial(*parts: Layer | Sequence[Layer], name: str = "serial", mode: str = "checkpoint",
                 policy: Callable | None = None, prevent_cse: bool = True) -> Layer:
    """``nn.serial`` of the flattened ``parts`` where each *list* of layers is one recomputed block.

    ``remat_serial(nn.flatten(), [nn.dense(64), nn.relu], [nn.dense(64), nn.relu], nn.dense(10))``
    has the params tree of ``nn.serial(nn.flatten(), nn.dense(64), nn.relu, nn.dense(64),
    nn.relu, nn.dense(10))`` (``dense_0``, ``dense_1``, ``dense_2``), the same child keys
    (``fold_in(key, i)`` by position in the flattened list) and equal outputs; under ``grad``
    each block keeps only its input.  ``mode``, ``policy``, ``prevent_cse``: as :func:`remat`.
    """
    _check_mode(mode)
    layers, blocks = [], []  # blocks: (start, stop, recomputed)
    for part in parts:
        block = not isinstance(part, Layer) and isinstance(part, (list, tuple))  # a Layer is a tuple too
        group = list(part) if block else [part]
        if not group:
            raise ValueError("remat_serial: an empty block")
        blocks.append((len(layers), len(layers) + len(group), block))
        layers += group
    plain = serial(*layers, name=name)  # init, names and error checks are serial's
    names = child_names(layers)

    def apply(params, state, x, *, key=None, train=False):
        check_children(params, names, "params")
        check_children(state, names, "state")
        train = bool(train)
        new_state = {}
        for start, stop, recomputed in blocks:
            idx = range(start, stop)

            def run(p, s, x, key, idx=idx):
                out = {}
                for i in idx:
                    x, si = apply_child(layers[i], names[i], p, s, x, child_key(key, i), train)
                    put_nonempty(out, names[i], si)
                return x, out

            sub_p = {names[i]: params[names[i]] for i in idx if names[i] in params}
            sub_s = {names[i]: state[names[i]] for i in idx if names[i] in state}
            x, s = (_wrap(run, mode, policy, prevent_cse) if recomputed else run)(sub_p, sub_s, x, key)
            new_state.update(s)
        return x, new_state

    return Layer(plain.init, apply, name)


def remat_cell(cell, *, policy: Callable | None = None):
    """A recurrent cell (``nn.lstm_cell``, ``nn.gru_cell``) whose step runs under ``jax.checkpoint``.

    Scanned by ``nn.rnn``, the backward pass then keeps only each step's carry
    and input and recomputes the gates; works on every backend (the
    recomputation lives in the backward loop's body, where no CSE reaches).
    Same params and values as ``cell``.
    """
    step = jax.checkpoint(cell.step, policy=policy, prevent_cse=False)  # in a scan body: no barrier needed
    return cell._replace(step=step)


def compiled_memory(fn: Callable, *args, **jit_kwargs) -> dict[str, int]:
    """XLA's memory analysis of ``jax.jit(fn, **jit_kwargs)`` compiled for ``args``, in bytes.

    ``temp`` is the scratch memory the program allocates (activations and
    residuals kept for the backward pass live here, though XLA may also park
    them in output buffers not yet written); ``argument``/``output`` the
    buffers passed in and out; ``peak`` is their sum less aliased (donated)
    bytes: the device memory one call needs.  Compiles ``fn`` (no FLOPs
    run); ShapeDtypeStructs serve as ``args``.
    """
    m = jax.jit(fn, **jit_kwargs).lower(*args).compile().memory_analysis()
    if m is None:
        raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis")
    out = {"temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
           "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out
