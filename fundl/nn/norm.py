"""Normalisation layers: layer norm, RMS norm, group norm and batch norm (channels-last).

All compute their statistics in float32 (float64 when ``x`` is float64) even
when ``x`` is bfloat16 or float16, and return ``y`` in ``x``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fundl.nn.core import Layer, LayerError, ShapeError, format_shape, get_param


def _stat_dtype(dtype):
    """float32, or wider if the input already is (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _axes(axis, ndim: int, name: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError(f"{name}: axis must name at least one axis")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"{name}: axis {a} is out of range for an input of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated axis in {axis!r}")
    return tuple(sorted(out))


def _expected(axis, sizes) -> str:
    """The input shape a layer norm accepts, for error messages."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if sizes is None:
        sizes = ("*",) * len(axes)
    if all(a < 0 for a in axes):  # trailing axes: (..., *, d1, d2)
        dims = ["*"] * -min(axes)
        for a, d in zip(sorted(axes), sizes):
            dims[a] = str(d)
        return "(..., " + ", ".join(dims) + ")"
    rank = max(a if a >= 0 else -a for a in axes) + 1
    return f"(rank >= {rank}) with sizes {tuple(sizes)} along axes {axes}"


def layer_norm(axis=-1, eps: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
               *, dtype=jnp.float32) -> Layer:
    """Normalise each example over ``axis`` (an int or a tuple of ints):

    ``y = (x - mean) / sqrt(var + eps) * scale + bias``

    with ``mean`` and the biased ``var`` (divide by n, as PyTorch) taken over
    ``axis``.  ``scale`` (ones) and ``bias`` (zeros) have the shape of the
    normalised axes, so ``layer_norm()`` on (batch, ..., C) is PyTorch's
    ``LayerNorm(C)`` and ``layer_norm((-2, -1))`` is ``LayerNorm((H, C))``.
    Axes count from the full input, batch axis included (negative axes are
    the natural choice); the batch axis itself cannot be normalised over.

    Examples:
        >>> ln = nn.layer_norm()
        >>> params, state, out_shape = ln.init(jax.random.key(0), (1, 10))
        >>> jax.tree.map(jnp.shape, params), out_shape
        ({'bias': (10,), 'scale': (10,)}, (1, 10))
    """
    name = "layer_norm"
    axis = axis if isinstance(axis, int) else tuple(axis)

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        axes = _axes(axis, len(input_shape), name)
        if 0 in axes:
            raise ShapeError(
                f"{name}: axis={axis} includes the batch axis 0 of input shape "
                f"{format_shape(input_shape)}; layer norm normalises each example on its own "
                "(use batch_norm to normalise over the batch)"
            )
        feat = tuple(input_shape[a] for a in axes)
        params = {}
        if use_scale:
            params["scale"] = jnp.ones(feat, dtype)
        if use_bias:
            params["bias"] = jnp.zeros(feat, dtype)
        return params, {}, input_shape

    def apply(params, state, x, *, key=None, train=False):
        shape = tuple(jnp.shape(x))
        want = None  # the normalised axes' sizes, known from scale or bias
        if use_scale or use_bias:
            want = tuple(jnp.shape(get_param(params, "scale" if use_scale else "bias")))
        try:
            axes = _axes(axis, len(shape), name)
        except ShapeError:
            axes = None
        if axes is None or (want is not None and tuple(shape[a] for a in axes) != want):
            raise ShapeError(
                f"{name} over axis={axis} expected input of shape "
                f"{_expected(axis, want)}, got shape {format_shape(shape)} (rank {len(shape)})"
            )
        x32 = x.astype(_stat_dtype(x.dtype))
        mean = jnp.mean(x32, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + eps)
        # scale/bias have the normalised axes' shape: put them back in place.
        bshape = tuple(shape[a] if a in axes else 1 for a in range(len(shape)))
        if use_scale:
            y = y * get_param(params, "scale").astype(y.dtype).reshape(bshape)
        if use_bias:
            y = y + get_param(params, "bias").astype(y.dtype).reshape(bshape)
        return y.astype(x.dtype), {}

    return Layer(init, apply, name)


def rms_norm(eps: float = 1e-6, use_scale: bool = True, *, dtype=jnp.float32) -> Layer:
    """Normalise each position over the last axis by its root mean square (no centring):

    ``y = x / sqrt(mean(x ** 2) + eps) * scale``

    as ``torch.nn.RMSNorm(C, eps)``; the norm of Llama-style transformers.
    Params: ``scale`` (ones), shape (C,).  Statistics in float32, ``y`` in ``x``'s dtype.

    Examples:
        >>> norm = nn.rms_norm()
        >>> params, _, _ = norm.init(jax.random.key(0), (1, 2))
        >>> x = jnp.array([[3.0, 4.0]])
        >>> y, _ = norm.apply(params, {}, x)
        >>> bool(jnp.allclose(y, x / jnp.sqrt(12.5)))      # the root mean square of (3, 4)
        True
    """
    name = "rms_norm"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ShapeError(f"{name} expected input of shape (batch, ..., features) (rank >= 2), "
                             f"got shape {format_shape(input_shape)}")
        return ({"scale": jnp.ones((input_shape[-1],), dtype)} if use_scale else {}), {}, input_shape

    def apply(params, state, x, *, key=None, train=False):
        if use_scale:
            c = jnp.shape(get_param(params, "scale"))[0]
            if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != c:
                raise ShapeError(f"{name} expected input of shape (..., {c}), got shape {format_shape(jnp.shape(x))}")
        x32 = x.astype(_stat_dtype(x.dtype))
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
        if use_scale:
            y = y * get_param(params, "scale").astype(y.dtype)
        return y.astype(x.dtype), {}

    return Layer(init, apply, name)


def _pmean(value, axis_name):
    """``lax.pmean`` over ``axis_name`` (None: no averaging), with a hint when
    the axis is not bound."""
    if axis_name is None:
        return value
    try:
        return jax.lax.pmean(value, axis_name)
    except NameError as e:
        raise LayerError(
            f"batch_norm(axis_name={axis_name!r}) in training mode must run inside "
            f"a transform that binds that axis, e.g. jax.pmap(..., axis_name={axis_name!r}), "
            f"jax.vmap(..., axis_name={axis_name!r}) or jax.shard_map; for a single "
            f"device use batch_norm(axis_name=None) ({e})"
        ) from None


def batch_norm(momentum: float = 0.9, eps: float = 1e-5, axis_name=None,
               use_scale: bool = True, use_bias: bool = True, *,
               dtype=jnp.float32) -> Layer:
    """Normalise each channel (the last axis) over all other axes.

    Training (``train=True``) uses the statistics of the batch::

        mean = E[x],  var = E[(x - mean)^2]            (biased: divide by n)
        y = (x - mean) / sqrt(var + eps) * scale + bias
        running_mean <- momentum * running_mean + (1 - momentum) * mean
        running_var  <- momentum * running_var  + (1 - momentum) * var * n / (n - 1)

    i.e. the running variance tracks the *unbiased* batch variance while the
    output is normalised with the biased one, exactly as PyTorch's
    ``BatchNorm`` (whose ``momentum`` is ``1 - momentum`` here).  Evaluation
    (``train=False``) normalises with the running statistics and returns the
    state unchanged.

    Params: ``scale`` (ones), ``bias`` (zeros), shape (C,).  State: ``mean``
    (zeros) and ``var`` (ones), shape (C,), float32.

    ``axis_name``: under ``pmap``/``vmap``/``shard_map`` with that axis name,
    the batch statistics are averaged over the axis with ``lax.pmean`` (and
    ``n`` is the global count), so N shards of B examples give the same
    output and running statistics as one call on the global batch of N*B
    (shards must be of equal size).  The variance is computed in two passes
    (global mean first, then the global mean of squared deviations), which
    costs a second small ``pmean`` but avoids the cancellation of
    ``E[x^2] - E[x]^2``.

    Examples:
        >>> bn = nn.batch_norm()
        >>> params, state, _ = bn.init(jax.random.key(0), (1, 3))
        >>> x = jnp.array([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0]])
        >>> y, state = bn.apply(params, state, x, train=True)   # keep the returned state
        >>> y.round(3)
        Array([[-1., -1., -1.],
               [ 1.,  1.,  1.]], dtype=float32)
        >>> state["mean"]                                       # 0.9 * 0 + 0.1 * batch mean
        Array([0.1, 0.2, 0.4], dtype=float32)
    """
    name = "batch_norm"
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name}: momentum must be in [0, 1], got {momentum}")

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ShapeError(
                f"{name} expects an input shape (batch, ..., channels) of rank >= 2, "
                f"got {format_shape(input_shape)}"
            )
        c = input_shape[-1]
        params = {}
        if use_scale:
            params["scale"] = jnp.ones((c,), dtype)
        if use_bias:
            params["bias"] = jnp.zeros((c,), dtype)
        state = {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}
        return params, state, input_shape

    def apply(params, state, x, *, key=None, train=False):
        running_mean = get_param(state, "mean", "state")
        running_var = get_param(state, "var", "state")
        c = running_mean.shape[-1]
        shape = tuple(jnp.shape(x))
        if len(shape) < 2 or shape[-1] != c:
            raise ShapeError(
                f"{name} expected input of shape (batch, ..., {c}) (rank >= 2), "
                f"got shape {format_shape(shape)} (rank {len(shape)})"
            )
        sdt = _stat_dtype(x.dtype)
        x32 = x.astype(sdt)
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = _pmean(jnp.mean(x32, axis=axes), axis_name)
            var = _pmean(jnp.mean(jnp.square(x32 - mean), axis=axes), axis_name)
            n = x.size // c
            if axis_name is not None:
                n = n * jax.lax.psum(1, axis_name)
            unbiased = var * (n / jnp.maximum(n - 1, 1))
            new_state = {
                "mean": (momentum * running_mean + (1 - momentum) * mean).astype(running_mean.dtype),
                "var": (momentum * running_var + (1 - momentum) * unbiased).astype(running_var.dtype),
            }
        else:
            mean, var = running_mean.astype(sdt), running_var.astype(sdt)
            new_state = {"mean": running_mean, "var": running_var}
        y = (x32 - mean) * jax.lax.rsqrt(var + eps)
        if use_scale:
            y = y * get_param(params, "scale").astype(sdt)
        if use_bias:
            y = y + get_param(params, "bias").astype(sdt)
        return y.astype(x.dtype), new_state

    return Layer(init, apply, name)


def group_norm(num_groups: int, eps: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
               *, dtype=jnp.float32) -> Layer:
    """Normalise each example over groups of channels (the last axis), as PyTorch's ``GroupNorm``.

    For input ``(batch, ..., C)`` the ``C`` channels are split into
    ``num_groups`` contiguous groups of ``C // num_groups``; each example's
    mean and biased variance (divide by n) are taken over its spatial axes and
    the channels of one group::

        y = (x - mean_group) / sqrt(var_group + eps) * scale + bias

    ``scale`` (ones) and ``bias`` (zeros) have shape (C,), per channel.
    ``num_groups=1`` is layer norm over all non-batch axes with a per-channel
    affine; ``num_groups=C`` is instance norm.  The statistics are per example
    and there is no state, so unlike :func:`batch_norm` the examples of a
    batch never interact: the layer to use where per-example gradients
    (``fundl.transforms.per_example_grads``, DP-SGD) are needed.

    Examples:
        >>> gn = nn.group_norm(4)                    # 16 channels in 4 groups of 4
        >>> params, state, out_shape = gn.init(jax.random.key(0), (1, 28, 28, 16))
        >>> jax.tree.map(jnp.shape, params), state, out_shape
        ({'bias': (16,), 'scale': (16,)}, {}, (1, 28, 28, 16))
    """
    name = "group_norm"
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{name}: num_groups must be a positive int, got {num_groups!r}")

    def check(shape, c=None) -> int:
        """The channel count of ``shape``: rank >= 2, ``c`` channels if given, divisible into the groups."""
        if len(shape) < 2 or (c is not None and shape[-1] != c):
            want = f"(batch, ..., {c})" if c is not None else "(batch, ..., channels)"
            raise ShapeError(f"{name} expected input of shape {want} (rank >= 2), "
                             f"got shape {format_shape(shape)} (rank {len(shape)})")
        if shape[-1] % num_groups:
            raise ShapeError(f"{name}({num_groups}): the {shape[-1]} channels of input shape {format_shape(shape)} "
                             f"do not split into {num_groups} groups; use a num_groups that divides {shape[-1]}")
        return shape[-1]

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        c = check(input_shape)
        params = {}
        if use_scale:
            params["scale"] = jnp.ones((c,), dtype)
        if use_bias:
            params["bias"] = jnp.zeros((c,), dtype)
        return params, {}, input_shape

    def apply(params, state, x, *, key=None, train=False):
        shape = tuple(jnp.shape(x))
        affine = "scale" if use_scale else "bias" if use_bias else None
        c = check(shape, jnp.shape(get_param(params, affine))[0] if affine else None)
        x32 = x.astype(_stat_dtype(x.dtype))
        g = x32.reshape(shape[:-1] + (num_groups, c // num_groups))
        axes = tuple(range(1, len(shape) - 1)) + (len(shape),)  # spatial axes and the channels of a group
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(shape)
        if use_scale:
            y = y * get_param(params, "scale").astype(y.dtype)
        if use_bias:
            y = y + get_param(params, "bias").astype(y.dtype)
        return y.astype(x.dtype), {}

    return Layer(init, apply, name)
