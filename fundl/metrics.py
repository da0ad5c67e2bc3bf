"""Metrics per element, and their correct averaging over batches.

A metric function maps ``(outputs, labels)`` to per-element values; the
averages over an epoch are ``sum(values * mask) / sum(mask)``, which weighs
every example once whatever the batch sizes (a mean of batch means would not).
"""

import jax.numpy as jnp


def accuracy(logits, labels):
    """1.0 where ``argmax(logits) == label``, else 0.0; shape of ``labels``.

    Examples:
        >>> from fundl.metrics import accuracy
        >>> accuracy(jnp.array([[0.1, 0.9], [0.8, 0.2]]), jnp.array([1, 1]))
        Array([1., 0.], dtype=float32)
    """
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def top_k_accuracy(logits, labels, k: int):
    """1.0 where the label is among the ``k`` largest logits.

    Ties are counted in the label's favour only if its logit is strictly
    among the top ``k`` values (rank = number of strictly larger logits).

    Examples:
        >>> from fundl.metrics import top_k_accuracy
        >>> top_k_accuracy(jnp.array([[0.1, 0.5, 0.4]]), jnp.array([2]), k=2)
        Array([1.], dtype=float32)
    """
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)
    return (rank < k).astype(jnp.float32)


def classification_metrics(top_k=()):
    """``metrics_fn(logits, labels) -> {"accuracy", "top<k>_accuracy"...}`` per element.

    The default ``metrics_fn`` of ``make_train_step`` and ``make_eval_step``.

    Examples:
        >>> from fundl.metrics import classification_metrics
        >>> metrics_fn = classification_metrics(top_k=(5,))
        >>> sorted(metrics_fn(jnp.zeros((4, 10)), jnp.zeros(4, jnp.int32)))
        ['accuracy', 'top5_accuracy']
    """

    def metrics_fn(logits, labels):
        out = {"accuracy": accuracy(logits, labels)}
        for k in top_k:
            out[f"top{k}_accuracy"] = top_k_accuracy(logits, labels, k)
        return out

    return metrics_fn


def no_metrics(outputs, labels):
    """No metrics (a ``metrics_fn`` for steps that report only the loss)."""
    return {}


class MeanAccumulator:
    """Host-side running weighted means: ``add(sums, count)`` then ``means()``."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0.0

    def add(self, sums: dict, count: float) -> None:
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += float(count)

    def means(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        return {name: s / self.count for name, s in self.sums.items()}
