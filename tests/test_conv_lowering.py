"""The CPU lowering of convolutions (fundl.nn.conv_lowering): one convolution forward, the weight
gradient in batch chunks.  The rule, the numerics against ``lax.conv_general_dilated``, the
compiled program (chunks in the weight gradient only), and every transform."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fundl import nn
from fundl.nn import conv_lowering
from fundl.nn import flat_random
from fundl.nn.conv_lowering import convolve, cpu_chunks, in_chunks
from conftest import ROOT, spy_platform_default

MiB = 2**20
ARGS_2D = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _data(batch=32, size=12, cin=4, cout=6, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return flat_random.normal(kx, (batch, size, size, cin)), flat_random.normal(kw, (3, 3, cin, cout)) / 6


def _close(got, want, rel=2e-6):
    """Equal up to float32 summation order: errors relative to the largest entry."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(1.0, float(np.abs(want).max())))


def _whole(x, w, **args):
    return lax.conv_general_dilated(x, w, **(args or ARGS_2D))


# ---------------------------------------------------------------- the rule

@pytest.mark.parametrize("batch, chunks", [(128, 16), (64, 8), (32, 4), (100, 10), (60, 6), (256, 16), (1024, 16)])
def test_a_large_2d_convolution_is_split_into_chunks_near_eight_examples(batch, chunks):
    assert cpu_chunks(batch, 6 * MiB, 2) == chunks
    assert batch % chunks == 0


@pytest.mark.parametrize("batch, out_bytes, dims", [
    (128, MiB - 1, 2),    # below the measured threshold
    (8, 64 * MiB, 2),     # a chunk's worth already
    (37, 64 * MiB, 2),    # a prime batch: no equal chunks
    (100, 16 * MiB, 1),   # 1D stays whole (measured slower or mixed)
])
def test_small_1d_and_indivisible_convolutions_stay_whole(batch, out_bytes, dims):
    assert cpu_chunks(batch, out_bytes, dims) == 1


@pytest.mark.slow
def test_chunks_that_do_not_divide_the_batch_are_refused():
    x, w = _data(batch=10)
    with pytest.raises(ValueError, match="chunks=4 does not divide the batch of 10"):
        convolve(x, w, chunks=4, **ARGS_2D)


# ---------------------------------------------------------------- numerics

@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ARGS_2D,
    dict(window_strides=(2, 2), padding=((1, 2), (0, 1)), rhs_dilation=(2, 1),
         dimension_numbers=("NHWC", "HWIO", "NHWC")),
])
def test_chunks_equal_one_convolution_forward_and_gradients(args):
    x, w = _data()
    y_whole, vjp_whole = jax.vjp(lambda a, b: _whole(a, b, **args), x, w)
    y_chunk, vjp_chunk = jax.vjp(lambda a, b: convolve(a, b, chunks=4, **args), x, w)
    np.testing.assert_allclose(y_chunk, y_whole, rtol=1e-6, atol=1e-6)
    dy = flat_random.normal(jax.random.key(3), y_whole.shape)
    for got, want in zip(vjp_chunk(dy), vjp_whole(dy)):
        _close(got, want)


@pytest.mark.slow
def test_the_bias_is_added_with_and_without_chunks():
    x, w = _data()
    b = jnp.arange(6.0)
    _close(convolve(x, w, b, chunks=4, **ARGS_2D), _whole(x, w) + b)
    _close(convolve(x, w, b, chunks=1, **ARGS_2D), _whole(x, w) + b)


@pytest.mark.slow
def test_grouped_convolution_in_chunks():
    x, _ = _data(cin=4)
    w = flat_random.normal(jax.random.key(1), (3, 3, 2, 6))
    args = dict(ARGS_2D, feature_group_count=2)
    y_chunk, vjp_chunk = jax.vjp(lambda a, b: convolve(a, b, chunks=8, **args), x, w)
    y_whole, vjp_whole = jax.vjp(lambda a, b: _whole(a, b, **args), x, w)
    np.testing.assert_allclose(y_chunk, y_whole, rtol=1e-6, atol=1e-6)
    dy = flat_random.normal(jax.random.key(3), y_whole.shape)
    for got, want in zip(vjp_chunk(dy), vjp_whole(dy)):
        _close(got, want)


@pytest.mark.slow
def test_chunk_i_holds_examples_i_plus_multiples_of_the_chunk_count():
    """Interleaved, so that a batch split over devices in blocks splits every chunk evenly;
    the output comes back in the input's order (each example is convolved on its own)."""
    x, w = _data(batch=12)
    x = x.at[5].set(100.0)  # one loud example: its output must land at index 5 only
    seen = []

    def conv(a, b):
        seen.append(a)
        return _whole(a, b)

    y = in_chunks(conv, x, w, 3)
    np.testing.assert_allclose(y, _whole(x, w), rtol=1e-6, atol=1e-4)
    loud = jnp.abs(y).reshape(12, -1).max(axis=1)
    assert int(jnp.argmax(loud)) == 5
    np.testing.assert_array_equal(seen[2], x[2::3])  # chunk 2: examples 2, 5, 8, 11


# ---------------------------------------------------------------- the compiled program

def _convolutions_in(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.convolution")


@pytest.mark.slow
def test_on_cpu_only_the_weight_gradient_is_split_into_chunks():
    """The forward convolution and the input gradient are one convolution each; the weight
    gradient is one per chunk, and a tangent that is not asked for costs nothing."""
    x = jnp.zeros((32, 28, 28, 1))
    layer = nn.conv2d(32, 3)
    params, state, _ = layer.init(jax.random.key(0), x.shape)  # output 3.1 MiB: chunked
    assert cpu_chunks(32, 32 * 28 * 28 * 32 * 4, 2) == 4
    out = lambda p, a: layer.apply(p, state, a)[0]
    loss = lambda p, a: out(p, a).sum()
    assert _convolutions_in(out, params, x) == 1
    assert _convolutions_in(jax.value_and_grad(loss), params, x) == 1 + 4  # a first layer: no input gradient
    assert _convolutions_in(jax.value_and_grad(loss, argnums=(0, 1)), params, x) == 1 + 1 + 4
    assert _convolutions_in(jax.value_and_grad(loss, argnums=1), params, x) == 1 + 1
    # forward mode: the tangent in x is whole, the tangent in w in chunks
    jvp_x = lambda p, a: jax.jvp(lambda b: out(p, b), (a,), (a,))
    jvp_w = lambda p, a: jax.jvp(lambda q: out(q, a), (p,), (p,))
    assert _convolutions_in(jvp_x, params, x) == 1 + 1
    assert _convolutions_in(jvp_w, params, x) == 1 + 4


def test_small_convolutions_lower_to_one_convolution():
    layer = nn.conv1d(25, 5, stride=2)  # MNIST-1D's first layer, batch 100: 0.2 MiB out
    x = jnp.zeros((100, 40, 1))
    params, state, _ = layer.init(jax.random.key(0), x.shape)
    assert _convolutions_in(lambda p, a: layer.apply(p, state, a)[0], params, x) == 1


@pytest.mark.slow
def test_other_platforms_get_the_whole_convolution(monkeypatch):
    """The chunked weight gradient is the ``cpu`` branch of ``lax.platform_dependent``; every
    other platform lowers the default branch: one convolution."""
    seen = spy_platform_default(monkeypatch, conv_lowering)
    x, w = _data(batch=8, size=6)
    jax.grad(lambda b: convolve(x, b, chunks=4, **ARGS_2D).sum())(w)
    assert _convolutions_in(seen["default"], x, w) == 1
    np.testing.assert_array_equal(seen["default"](x, w), _whole(x, w))


# ---------------------------------------------------------------- transforms

@pytest.mark.slow
def test_jit_vmap_grad_jvp_and_hessian_vector_compose_with_chunks():
    x, w = _data(batch=16, size=8, cin=2, cout=3)
    whole = lambda b, a: jnp.sum(jnp.tanh(_whole(a, b)) ** 2)
    chunk = lambda b, a: jnp.sum(jnp.tanh(convolve(a, b, chunks=4, **ARGS_2D)) ** 2)
    _close(jax.jit(jax.grad(chunk))(w, x), jax.grad(whole)(w, x))
    v = flat_random.normal(jax.random.key(7), w.shape)
    _close(jax.jvp(lambda b: chunk(b, x), (w,), (v,))[1], jax.jvp(lambda b: whole(b, x), (w,), (v,))[1])
    hvp = lambda f: jax.jvp(jax.grad(lambda b: f(b, x)), (w,), (v,))[1]  # forward over reverse
    _close(hvp(chunk), hvp(whole), rel=1e-5)
    # an ensemble: members' weights and inputs batched by vmap
    ws = jnp.stack([w, 2 * w])
    xs = jnp.stack([x, -x])
    _close(jax.vmap(chunk)(ws, xs), jax.vmap(whole)(ws, xs))
    # gradients per group of 4 examples (vmap over groups; each group in 4 chunks) sum to the whole
    per_group = jax.vmap(jax.grad(chunk), in_axes=(None, 0))(w, x.reshape((4, 4) + x.shape[1:]))
    _close(per_group.sum(0), jax.grad(whole)(w, x))


@pytest.mark.slow
def test_a_batch_sharded_over_two_devices_stays_local_in_chunks():
    """Under ``jit`` with the batch split over 2 (fake CPU) devices, the loss and gradients
    through the chunked weight gradient equal one convolution's, and the compiled program
    moves no activations between devices (interleaved chunks split evenly over the blocks;
    only the weight gradient is summed over them)."""
    code = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update('jax_num_cpu_devices', 2)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax import lax
from fundl.nn import flat_random
from fundl.nn.conv_lowering import convolve
args = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
mesh = Mesh(np.array(jax.devices()), ('data',))
x = jax.device_put(flat_random.normal(jax.random.key(0), (32, 12, 12, 4)), NamedSharding(mesh, P('data')))
w = jax.device_put(flat_random.normal(jax.random.key(1), (3, 3, 4, 6)), NamedSharding(mesh, P()))
loss = lambda c: lambda a, b: jnp.sum(jnp.tanh(c(a, b)) ** 2)
f = jax.jit(jax.value_and_grad(loss(lambda a, b: convolve(a, b, chunks=4, **args)), argnums=(0, 1)),
            out_shardings=(NamedSharding(mesh, P()), (NamedSharding(mesh, P('data')), NamedSharding(mesh, P()))))
got, want = f(x, w), jax.value_and_grad(loss(lambda a, b: lax.conv_general_dilated(a, b, **args)), argnums=(0, 1))(x, w)
for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)
hlo = f.lower(x, w).compile().as_text()
moves = [op for op in ('all-gather', 'all-to-all', 'collective-permute') if op in hlo]
print('MOVES', moves)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MOVES []" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_values_gradients_tangents_and_second_derivatives_equal_lax_with_a_bias():
    """Against ``lax.conv_general_dilated`` + bias: the value, the gradient in every argument,
    tangents in every argument together, forward-over-reverse and reverse-over-reverse second
    derivatives, and per-example gradients by ``vmap``."""
    x, w = _data(batch=8, size=6, cin=2, cout=3)
    b = jnp.linspace(-1.0, 1.0, 3)
    whole = lambda a, c, d: jnp.sum(jnp.tanh(_whole(a, c) + d) ** 2)
    chunk = lambda a, c, d: jnp.sum(jnp.tanh(convolve(a, c, d, chunks=4, **ARGS_2D)) ** 2)
    args = (x, w, b)
    _close(chunk(*args), whole(*args))
    for got, want in zip(jax.grad(chunk, (0, 1, 2))(*args), jax.grad(whole, (0, 1, 2))(*args)):
        _close(got, want, rel=1e-5)
    tangents = tuple(flat_random.normal(jax.random.key(i), a.shape) for i, a in enumerate(args))
    _close(jax.jvp(chunk, args, tangents)[1], jax.jvp(whole, args, tangents)[1], rel=1e-5)
    for argnum in (0, 1):  # Hessian-vector products in x and in w, both ways round
        fwd_rev = lambda f: jax.jvp(lambda a: jax.grad(f, argnum)(*args[:argnum], a, *args[argnum + 1:]),
                                    (args[argnum],), (tangents[argnum],))[1]
        _close(fwd_rev(chunk), fwd_rev(whole), rel=1e-4)
        rev_rev = lambda f: jax.grad(lambda *a: jnp.vdot(jax.grad(f, argnum)(*a), tangents[argnum]), argnum)(*args)
        _close(rev_rev(chunk), rev_rev(whole), rel=1e-4)
    per_example = lambda f: jax.vmap(jax.grad(lambda c, a: f(a[None], c, b)), in_axes=(None, 0))(w, x)
    whole_one = lambda a, c, d: whole(a, c, d)  # one example: below any chunk count, compare to lax
    _close(per_example(lambda a, c, d: chunk(jnp.tile(a, (4, 1, 1, 1)), c, d) / 4),
           per_example(whole_one), rel=1e-5)
