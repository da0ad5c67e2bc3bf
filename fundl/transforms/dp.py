"""DP-SGD: per-example clipping, Gaussian noise, and the privacy accounting of a run.

One step (Abadi et al. 2016, "Deep Learning with Differential Privacy"; the
estimator of jax-privacy and Opacus)::

    g_i   = grad of example i's loss                       (per_example_grads)
    c_i   = g_i * min(1, C / ||g_i||)                      (||.||: L2 over the whole param tree)
    g     = (sum_{i real} c_i + N(0, (sigma * C)^2 I)) / B_expected
    params, opt_state = optimizer.update(g, ...)           (any optax optimiser: post-processing)

with ``C = clip_norm``, ``sigma = noise_multiplier`` and ``B_expected =
expected_batch_size``, the *expected* batch size ``q * N_train`` of Poisson
sampling with rate ``q``, which is a constant.  Dividing by the number of
examples actually sampled instead would make the divisor depend on whether a
given example was drawn, and the sensitivity analysis (one example changes
the noised sum by at most ``C``) covers the sum, not a data-dependent mean;
the constant divisor is the standard unbiased estimator of the mean clipped
gradient.  ``optax.contrib.dpsgd`` divides by the batch's leading dimension
instead (padding included) and has no mask: with full, unpadded batches and
``expected_batch_size`` equal to the batch size the two agree (tested).

The batch holds a ``mask`` (1 real, 0 padding): the Poisson loader
(``fundl.data.poisson.PoissonLoader``) pads its variable-size batches to one shape,
and masked examples contribute nothing (their clipped gradients are
multiplied by 0; the noise is added once, to the sum).

Keys: the step key is ``fold_in(base_key(state), state.step)`` as in
``make_train_step``; ``model_key, noise_key = split(step_key)``; example i
gets ``fold_in(model_key, i)`` (dropout masks differ per example); the noise
of the j-th param leaf (in ``jax.tree.leaves`` order) is
``normal(split(noise_key, L)[j], shape) * sigma * C``.

Privacy: T such steps with Poisson sampling at rate q are the composition of
T Poisson-subsampled Gaussian mechanisms with noise multiplier sigma;
:func:`epsilon` computes the ε of that composition for a given δ with
Google's ``dp-accounting`` (PLD accountant by default, RDP on request),
under add/remove-one-example adjacency.  The guarantee holds for the
*parameters* (every intermediate one), only if the batches really are
Poisson samples (``PoissonLoader``), every gradient the optimiser sees comes
through this step, and the model does not couple examples (batch norm is
refused: ``fundl.transforms.per_example``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics
from fundl.nn import flat_random
from fundl.train.step import base_key, forward, resolve_dtype
from fundl.transforms.per_example import global_norms, per_example_grads

ACCOUNTANTS = ("pld", "rdp")


# ------------------------------------------------------------ aggregation
def clip_and_sum(grads, clip_norm: float, mask=None):
    """``(sum_i mask_i * g_i * min(1, C / ||g_i||), norms)`` for per-example ``grads`` (leading axis N).

    ``norms`` are the per-example global L2 norms before clipping, shape (N,)."""
    norms = global_norms(grads)
    factor = clip_norm / jnp.maximum(norms, clip_norm)  # min(1, C / ||g||), 1 at ||g|| = 0
    if mask is not None:
        factor = factor * mask.astype(factor.dtype)
    summed = jax.tree.map(lambda g: jnp.einsum("i,i...->...", factor.astype(g.dtype), g), grads)
    return summed, norms


def gaussian_noise(key, tree, std):
    """``N(0, std^2)`` noise shaped like ``tree``; leaf j uses ``split(key, L)[j]`` (``jax.tree.leaves`` order)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [std * flat_random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noise)


def privatize(grads, key, *, clip_norm: float, noise_multiplier: float, expected_batch_size: float,
              mask=None, axis_name: str | None = None):
    """The DP-SGD gradient from per-example ``grads``: clipped, summed (over ``axis_name`` too),
    noised once and divided by ``expected_batch_size``.  Returns ``(gradient, norms)``."""
    summed, norms = clip_and_sum(grads, clip_norm, mask)
    if axis_name is not None:
        summed = jax.lax.psum(summed, axis_name)
    if noise_multiplier:
        noise = gaussian_noise(key, summed, noise_multiplier * clip_norm)  # same key on every device
        summed = jax.tree.map(jnp.add, summed, noise)
    return jax.tree.map(lambda s: s / expected_batch_size, summed), norms


# ------------------------------------------------------------------ step
def make_dp_train_step(model, optimizer: optax.GradientTransformation, loss_fn: Callable = softmax_cross_entropy,
                       metrics_fn: Callable | None = None, *, clip_norm: float, noise_multiplier: float,
                       expected_batch_size: float, compute_dtype="float32", axis_name: str | None = None):
    """A DP-SGD ``step(train_state, batch) -> (train_state, metrics)`` with the contract of
    ``fundl.train.step.make_train_step`` (pure, jit it; same TrainState, same step key).

    ``batch``: ``{"x", "y"}`` and optionally ``"mask"`` (1 real, 0 padding; all real without it).
    Metrics are means over the real examples: ``loss`` and the metrics function's entries, plus
    ``batch_size`` (real examples this step: Poisson sampling varies it), ``grad_norm`` (mean
    per-example norm before clipping) and ``clipped`` (fraction of examples clipped).  They are
    computed from the per-example forward passes (train mode), before noise.

    ``compute_dtype``: float32 or bfloat16 (cast inside, as ``make_train_step``); float16's loss
    scaling is not supported.  ``axis_name``: inside ``pmap``/named ``vmap`` each device
    clips its examples, the sums are ``psum``-ed, and the same noise (one key) is added on every
    device, so N devices equal one device on the global batch.  A model whose training-mode
    state depends on the examples (batch norm) raises ``ExampleCouplingError``.
    """
    if not clip_norm > 0:
        raise ValueError(f"make_dp_train_step: clip_norm must be > 0, got {clip_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"make_dp_train_step: noise_multiplier must be >= 0, got {noise_multiplier}")
    if not expected_batch_size > 0:
        raise ValueError(f"make_dp_train_step: expected_batch_size must be > 0, got {expected_batch_size}")
    metrics_fn = classification_metrics() if metrics_fn is None else metrics_fn
    compute_dtype = resolve_dtype(compute_dtype)
    if compute_dtype == jnp.float16:
        raise ValueError("make_dp_train_step: float16 needs loss scaling, which DP-SGD does not support here; "
                         "use compute_dtype float32 or bfloat16")

    def example_loss(params, example, *, model_state, key):
        out, new_state = forward(model, params, model_state, example["x"], key, True, compute_dtype)
        loss = jnp.mean(loss_fn(out, example["y"]))
        values = {k: jnp.mean(v) for k, v in metrics_fn(out, example["y"]).items()}
        return loss, (new_state, {"loss": loss, **values})

    def step(state, batch):
        key = jax.random.fold_in(base_key(state), state.step)
        model_key, noise_key = jax.random.split(key)
        if axis_name is not None:  # distinct dropout masks per device; the noise key stays shared
            model_key = jax.random.fold_in(model_key, jax.lax.axis_index(axis_name))
        examples = {"x": batch["x"], "y": batch["y"]}
        mask = batch.get("mask")
        mask = jnp.ones(jnp.shape(batch["y"])[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        grads, (new_model_state, per_example) = per_example_grads(
            example_loss, state.params, examples, model_state=state.model_state, key=model_key, has_aux=True)
        grads, norms = privatize(grads, noise_key, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                                 expected_batch_size=expected_batch_size, mask=mask, axis_name=axis_name)
        sums = {k: jnp.sum(v * mask) for k, v in per_example.items()}
        sums["grad_norm"] = jnp.sum(norms * mask)
        sums["clipped"] = jnp.sum((norms > clip_norm) * mask)
        count = jnp.sum(mask)
        if axis_name is not None:
            sums, count = jax.lax.psum((sums, count), axis_name)
        metrics = {k: v / jnp.maximum(count, 1.0) for k, v in sums.items()}
        metrics["batch_size"] = count
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, model_state=new_model_state,
                             opt_state=opt_state), metrics

    step.model = model  # fit checks its data against the model's classes (fundl.train.data_checks)
    return step


# ------------------------------------------------------------ accounting
def dp_event(noise_multiplier: float, sampling_rate: float, steps: int):
    """The ``dp_accounting`` event of ``steps`` Poisson-subsampled Gaussian mechanisms."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        int(steps))


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *,
            accountant: str = "pld") -> float:
    """ε such that ``steps`` DP-SGD steps with Poisson sampling at ``sampling_rate`` and Gaussian
    noise of ``noise_multiplier`` times the clip norm are (ε, δ)-DP (add/remove-one adjacency).

    ``accountant``: ``"pld"`` (privacy loss distributions, the tighter bound; dp_accounting's
    ``PLDAccountant`` with its default discretisation) or ``"rdp"`` (Rényi DP, the accountant of
    Abadi et al.'s moments accountant, TF Privacy and Opacus; ``RdpAccountant`` with its default
    orders and conversion).  0 steps: 0.  No noise: ``inf`` (no privacy).
    """
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ImportError("privacy accounting needs Google's dp-accounting package: pip install dp-accounting "
                          "(or fundl[privacy])") from None
    from dp_accounting import pld, rdp

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"epsilon: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta must be in (0, 1), got {delta}")
    if not 0 <= sampling_rate <= 1:
        raise ValueError(f"epsilon: sampling_rate must be in [0, 1], got {sampling_rate}")
    if steps < 0 or noise_multiplier < 0:
        raise ValueError(f"epsilon: steps and noise_multiplier must be >= 0, got {steps}, {noise_multiplier}")
    if steps == 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    acc.compose(dp_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


# ------------------------------------------------------------- a DP run
class DPTraining:
    """What a DP-SGD run needs beyond a plain one: its Poisson loader, its step, and its ε.

    Built by ``fundl.run.privacy.dp_setup`` from a config's ``[privacy]`` section, or by hand::

        dp = DPTraining(PoissonLoader(data.train, 100, seed=0), clip_norm=1.0, noise_multiplier=1.0,
                        delta=1e-5)
        step = dp.make_train_step(model, optimizer)
        result = fit(state, step, dp.loader, num_steps=T, eval_fn=dp.with_epsilon(eval_fn), ...)
        summary.update(dp.summary(T))
    """

    def __init__(self, loader, *, clip_norm: float, noise_multiplier: float, delta: float,
                 accountant: str = "pld"):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"DPTraining: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not 0 < delta < 1:
            raise ValueError(f"DPTraining: delta must be in (0, 1), got {delta}")
        self.loader = loader
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.delta, self.accountant = float(delta), accountant
        self.sampling_rate = float(loader.sampling_rate)
        self.expected_batch_size = float(loader.batch_size)  # q * N: the estimator's divisor

    def make_train_step(self, model, optimizer, loss_fn: Callable = softmax_cross_entropy,
                        metrics_fn: Callable | None = None, *, compute_dtype="float32",
                        axis_name: str | None = None):
        return make_dp_train_step(model, optimizer, loss_fn, metrics_fn, clip_norm=self.clip_norm,
                                  noise_multiplier=self.noise_multiplier,
                                  expected_batch_size=self.expected_batch_size, compute_dtype=compute_dtype,
                                  axis_name=axis_name)

    def epsilon(self, steps: int) -> float:
        """ε after ``steps`` steps at this run's δ (``inf`` without noise)."""
        return epsilon(self.noise_multiplier, self.sampling_rate, int(steps), self.delta, accountant=self.accountant)

    def with_epsilon(self, eval_fn: Callable | None) -> Callable | None:
        """``eval_fn`` whose records also hold ``epsilon`` and ``delta`` at the state's step, so
        metrics.jsonl logs the privacy spent beside the test accuracy at every evaluation."""
        if eval_fn is None:
            return None

        def wrapped(state):
            from fundl.train.state import current_step

            out = dict(eval_fn(state))
            step = current_step(state)
            eps = self.epsilon(step)
            out.update(epsilon=None if math.isinf(eps) else eps, delta=self.delta)
            return out

        return wrapped

    def summary(self, steps: int) -> dict:
        """The summary.json entries: ``epsilon`` (None when the noise multiplier is 0: no privacy),
        ``delta`` and what they were computed from."""
        eps = self.epsilon(steps)
        return {"epsilon": None if math.isinf(eps) else eps, "delta": self.delta,
                "privacy": {"accountant": self.accountant, "clip_norm": self.clip_norm,
                            "noise_multiplier": self.noise_multiplier, "sampling": "poisson",
                            "sampling_rate": self.sampling_rate, "expected_batch_size": self.expected_batch_size,
                            "padded_batch_size": int(self.loader.max_batch_size), "steps": int(steps)}}

    def describe(self, steps: int) -> str:
        eps = self.epsilon(steps)
        what = "no privacy (noise_multiplier = 0)" if math.isinf(eps) else f"epsilon = {eps:.4g} at delta = {self.delta:g}"
        return (f"DP-SGD: {what} ({self.accountant.upper()} accountant) after {steps} steps of Poisson sampling at "
                f"rate {self.sampling_rate:.4g} (expected batch {self.expected_batch_size:g}, padded to "
                f"{self.loader.max_batch_size}), clip norm {self.clip_norm:g}, noise multiplier "
                f"{self.noise_multiplier:g}")
