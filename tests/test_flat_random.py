"""Random draws made flat (``fundl.nn.flat_random``) and fundl's initialisers built on them are
JAX's own values, bit for bit: every shape, dtype, PRNG implementation, axis choice and family.
Each test draws both sides in one jitted program (eagerly, every draw would compile on its own)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl.nn import flat_random
from fundl.nn import init as fundl_init

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def both_equal(pairs):
    """``pairs(key) -> [(ours, jax's), ...]`` in one jitted program; each pair equal bit for bit."""
    def check(key):
        for a, b in jax.jit(pairs)(key):
            assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
            as_numpy = lambda x: np.asarray(x, np.complex64 if jnp.iscomplexobj(x) else np.float32)  # noqa: E731
            np.testing.assert_array_equal(as_numpy(a), as_numpy(b))
    return check


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_flat_draws_equal_jax_random(impl):
    def pairs(key):
        out = []
        for shape in [(5,), (2, 3, 4), (2, 0, 3)]:
            for dtype in DTYPES if len(shape) == 1 else DTYPES[:1]:  # the dtype acts element by element
                out += [(flat_random.uniform(key, shape, dtype, -0.5, 2.0),
                         jax.random.uniform(key, shape, dtype, -0.5, 2.0)),
                        (flat_random.normal(key, shape, dtype), jax.random.normal(key, shape, dtype)),
                        (flat_random.truncated_normal(key, -2, 2, shape, dtype),
                         jax.random.truncated_normal(key, -2, 2, shape, dtype))]
            out.append((flat_random.bernoulli(key, 0.3, shape), jax.random.bernoulli(key, 0.3, shape)))
        return out
    both_equal(pairs)(jax.random.key(3, impl=impl))


def test_flat_draws_equal_jax_random_eagerly_and_under_vmap():
    key = jax.random.key(1)
    np.testing.assert_array_equal(flat_random.uniform(key, (2, 3)), jax.random.uniform(key, (2, 3)))
    keys = jax.random.split(key, 3)
    both_equal(lambda ks: [(jax.vmap(lambda k: flat_random.bernoulli(k, 0.7, (2, 3, 4)))(ks),
                            jax.vmap(lambda k: jax.random.bernoulli(k, 0.7, (2, 3, 4)))(ks))])(keys)


FAMILIES = ["lecun_normal", "lecun_uniform", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform"]


def test_variance_scaling_families_equal_jax():
    axes = dict(in_axis=(0, 1), out_axis=-1, batch_axis=2)  # a batched kernel: fans from the named axes

    def pairs(key):
        out = []
        for name in FAMILIES:
            ours, theirs = getattr(fundl_init, name), getattr(jax.nn.initializers, name)
            for shape, dtype in [((3, 4), jnp.float32), ((3, 4), jnp.bfloat16), ((2, 1, 3, 4), jnp.float32)]:
                out.append((ours()(key, shape, dtype), theirs()(key, shape, dtype)))
            out.append((ours(**axes)(key, (2, 3, 1, 4)), theirs(**axes)(key, (2, 3, 1, 4))))
        return out
    both_equal(pairs)(jax.random.key(11))


def test_variance_scaling_equals_jax_in_every_mode_and_distribution():
    def pairs(key):
        return [(fundl_init.variance_scaling(0.7, mode, dist)(key, (3, 2, 4)),  # fans: 3 x 2 and 3 x 4
                 jax.nn.initializers.variance_scaling(0.7, mode, dist)(key, (3, 2, 4)))
                for mode in ["fan_in", "fan_out", "fan_avg", "fan_geo_avg"]
                for dist in ["truncated_normal", "normal", "uniform"]]
    both_equal(pairs)(jax.random.key(5))


def test_plain_initialisers_equal_jax_and_complex_dtypes_go_to_jax():
    def pairs(key):
        out = []
        for dtype in DTYPES + [jnp.complex64]:
            out.append((fundl_init.normal(0.3)(key, (3, 4), dtype),
                        jax.nn.initializers.normal(0.3)(key, (3, 4), dtype)))
            if dtype != jnp.complex64:  # JAX has no complex truncated normal or uniform initialiser
                out.append((fundl_init.truncated_normal(0.5)(key, (3, 4), dtype),
                            jax.nn.initializers.truncated_normal(0.5)(key, (3, 4), dtype)))
                out.append((fundl_init.uniform(2.0)(key, (3, 4), dtype),
                            jax.nn.initializers.uniform(2.0)(key, (3, 4), dtype)))
        out.append((fundl_init.lecun_normal()(key, (3, 4), jnp.complex64),
                    jax.nn.initializers.lecun_normal()(key, (3, 4), jnp.complex64)))
        return out
    both_equal(pairs)(jax.random.key(2))


def test_bad_arguments_fail_as_jaxs_do():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="invalid mode"):
        fundl_init.variance_scaling(1.0, "fan_middle", "normal")(key, (2, 3))
    with pytest.raises(ValueError, match="invalid distribution"):
        fundl_init.variance_scaling(1.0, "fan_in", "cauchy")(key, (2, 3))
    with pytest.raises(ValueError, match="at least 2D"):
        fundl_init.lecun_normal()(key, (3,))
