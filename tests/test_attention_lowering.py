"""The CPU lowering of attention (3-D batched products, fundl.nn.attention_lowering) against
``jax.nn.dot_product_attention`` (XLA's implementation): values and gradients within 1e-6 with
causal, boolean and per-head masks, key lengths, grouped- and multi-query heads, and bfloat16;
on other platforms the library function itself is lowered."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl.nn import attention_lowering
from fundl.nn.attention_lowering import attend, batched_attention
from conftest import spy_platform_default

B, T, S, N, D = 2, 5, 7, 4, 8
RNG = np.random.default_rng(0)
Q = jnp.asarray(RNG.normal(size=(B, T, N, D)), jnp.float32)
K = jnp.asarray(RNG.normal(size=(B, S, N, D)), jnp.float32)
V = jnp.asarray(RNG.normal(size=(B, S, N, D)), jnp.float32)
G = jnp.asarray(RNG.normal(size=(B, T, N, D)), jnp.float32)      # a cotangent for the gradients
MASK = RNG.random((B, 1, T, S)) < 0.6
MASK[..., 0] = True
HEAD_MASK = RNG.random((B, N, T, S)) < 0.6
HEAD_MASK[:, 1] = False                                          # head 1 sees no key: uniform weights
LENGTHS = jnp.asarray([3, 7], jnp.int32)

CASES = {
    "plain": dict(),
    "causal": dict(causal=True, square=True),
    "mask": dict(mask=jnp.asarray(MASK)),
    "per_head_mask": dict(mask=jnp.asarray(HEAD_MASK)),
    "shared_mask": dict(mask=jnp.asarray(MASK[:1])),             # (1, 1, T, S): broadcast over the batch
    "lengths": dict(lengths=LENGTHS),
    "grouped": dict(kv_heads=2, mask=jnp.asarray(HEAD_MASK)),
    "multi_query": dict(kv_heads=1, lengths=LENGTHS),
    "everything": dict(causal=True, square=True, kv_heads=2, lengths=jnp.asarray([2, 5], jnp.int32),
                       mask=jnp.asarray(HEAD_MASK[..., :T])),
}


def _inputs(case):
    kw = dict(CASES[case])
    kv, square = kw.pop("kv_heads", N), kw.pop("square", False)
    s = T if square else S
    return Q, K[:, :s, :kv], V[:, :s, :kv], kw


def _library(q, k, v, mask=None, causal=False, lengths=None):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation="xla")


def _value_and_grads(fn, case):
    q, k, v, kw = _inputs(case)
    y, vjp = jax.vjp(lambda *a: fn(*a, **kw), q, k, v)
    return y, vjp(G)


@pytest.fixture(scope="module")
def both():
    """Every case's values and gradients both ways, in one compiled program (compiling each alone costs more)."""
    return jax.jit(lambda: {case: (_value_and_grads(batched_attention, case), _value_and_grads(_library, case))
                            for case in CASES})()


@pytest.mark.slow  # the fixture compiles every case, both ways, in one program
@pytest.mark.parametrize("case", list(CASES))
def test_batched_attention_equals_jax_nn_values_and_gradients(both, case):
    (y, grads), (y_ref, grads_ref) = both[case]
    np.testing.assert_allclose(y, y_ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.max(jnp.abs(b))), rtol=1e-5)


def test_attend_on_cpu_is_the_batched_form_under_jit_and_grad():
    """``attend`` (no implementation named) on CPU gives the 3-D form's values, jitted and differentiated."""
    q, k, v, kw = _inputs("everything")
    y, y_batched, (_, g), (y_ref, g_ref) = jax.jit(lambda: (
        attend(q, k, v, **kw), batched_attention(q, k, v, **kw),
        _value_and_grads(attend, "everything"), _value_and_grads(_library, "everything")))()
    np.testing.assert_array_equal(y, y_batched)
    np.testing.assert_allclose(y, y_ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.max(jnp.abs(b))), rtol=1e-5)


def test_bfloat16_matches_the_library_to_bfloat16_rounding():
    q, k, v, kw = _inputs("grouped")
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    ours, ref = jax.jit(lambda *a: (batched_attention(*a, **kw), _library(*a, **kw)))(q, k, v)
    assert ours.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2, rtol=2e-2)


def test_other_platforms_get_jax_nn_dot_product_attention(monkeypatch):
    """The 3-D form is the ``cpu`` branch of ``lax.platform_dependent``; the default branch, which every
    other platform lowers, is ``jax.nn.dot_product_attention`` (a GPU's fused kernel where it applies)."""
    seen = spy_platform_default(monkeypatch, attention_lowering)
    q, k, v, kw = _inputs("lengths")
    jax.eval_shape(lambda: attend(q, k, v, **kw))
    ours, ref = jax.jit(lambda: (seen["default"](q, k, v),
                                 jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kw["lengths"])))()
    np.testing.assert_array_equal(ours, ref)
    seen.clear()
    jax.eval_shape(lambda: attend(q, k, v, implementation="xla", **kw))          # a named implementation: jax.nn's, no platform choice
    assert not seen


def test_dropout_drops_weights_and_rescales():
    """With dropout the kept weights are scaled by 1 / (1 - rate): at rate 0.5 on one key, every output is
    the value times 0 or 2."""
    q, k, v = Q[:, :, :1], K[:, :1, :1], V[:, :1, :1]   # one key: its weight is 1 before dropout
    y = jax.jit(lambda *a: batched_attention(*a, dropout=0.5, key=jax.random.key(0)))(q, k, v)
    ratio = np.asarray(y / v)                            # (B, T, 1, D) / (B, 1, 1, D)
    assert set(np.round(np.unique(ratio), 5)) <= {0.0, 2.0} and 0.0 in ratio and 2.0 in np.round(ratio, 5)
