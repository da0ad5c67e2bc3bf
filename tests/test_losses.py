"""Losses and metrics: the per-element values a step averages (``fundl.losses``, ``fundl.metrics``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl.losses import mse, softmax_cross_entropy
from fundl.metrics import accuracy, top_k_accuracy
from fundl.nn import flat_random

KEY = jax.random.key(0)


def test_cross_entropy_matches_numpy():
    logits = flat_random.normal(KEY, (5, 4))
    labels = jnp.array([0, 3, 1, 2, 3])
    l = np.asarray(logits, np.float64)
    ref = -(l[np.arange(5), labels] - np.log(np.exp(l).sum(-1)))
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels), ref, rtol=1e-5)


def test_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match="expected labels"):
        softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match="integer class ids"):
        softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4,)))


def test_accuracy_top_k_and_mse():
    logits = jnp.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    labels = jnp.array([2, 0])
    np.testing.assert_array_equal(accuracy(logits, labels), [0.0, 1.0])
    np.testing.assert_array_equal(top_k_accuracy(logits, labels, 2), [1.0, 1.0])
    np.testing.assert_array_equal(top_k_accuracy(logits, labels, 1), [0.0, 1.0])
    np.testing.assert_allclose(mse(jnp.ones((2, 3)), jnp.zeros((2, 3))), [1.0, 1.0])
