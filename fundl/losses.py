"""Losses, returned *per element* so that callers choose how to reduce.

Per-element values let one function serve a training step (mean over the
batch), an evaluation over padded batches (masked sums) and per-example
gradients under ``vmap``.
"""

import jax
import jax.numpy as jnp


def _check_labels(logits, labels):
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have the logits' shape without the class axis: logits "
            f"{tuple(logits.shape)} -> expected labels {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")


def softmax_cross_entropy(logits, labels):
    """``-log softmax(logits)[label]`` for integer ``labels``.

    logits: (..., C); labels: (...) ints in [0, C). Returns shape (...).
    Computed in float32 whatever the logits' dtype.

    Examples:
        >>> from fundl.losses import softmax_cross_entropy
        >>> softmax_cross_entropy(jnp.array([[0.0, 0.0], [10.0, 0.0]]), jnp.array([0, 0])).round(4)
        Array([0.6931, 0.    ], dtype=float32)
    """
    _check_labels(logits, labels)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def mse(predictions, targets):
    """Squared error averaged over all but the leading (batch) axis: shape (B,).

    Examples:
        >>> from fundl.losses import mse
        >>> mse(jnp.ones((2, 3)), jnp.zeros((2, 3)))
        Array([1., 1.], dtype=float32)
    """
    if predictions.shape != targets.shape:
        raise ValueError(
            f"mse: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    err = jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1) if err.ndim > 1 else err


LOSSES = {"cross_entropy": softmax_cross_entropy, "mse": mse}
"""The losses by name."""
