"""The pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

GPT-2's and nanoGPT's block with ``norm="layer"`` and ``mlp="gelu"`` (a 4x
exact-GELU MLP); Llama's with ``norm="rms"``, ``mlp="swiglu"``, ``rope=True``
and ``num_kv_heads < num_heads``.  The input may be ``x`` or an attention
input dict (masks, lengths: :mod:`fundl.nn.attention`); a dict comes back
with its ``"x"`` replaced, so blocks chain in ``nn.serial`` with their masks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fundl.nn import flat_random
from fundl.nn import init as initializers
from fundl.nn.attention import multi_head_attention
from fundl.nn.core import KeyMissingError, Layer, ShapeError, format_shape, get_param
from fundl.nn.decoding import Decoder
from fundl.nn.linear import matmul
from fundl.nn.norm import layer_norm, rms_norm

__all__ = ["transformer_block", "exact_gelu"]

MLPS = ("gelu", "swiglu")
NORMS = ("layer", "rms")


def exact_gelu(x):
    """GELU, ``x * Phi(x)``, exactly (not the tanh approximation), as PyTorch writes it:
    ``0.5 x (1 + erf(x / sqrt 2))``.  Equal to ``jax.nn.gelu(x, approximate=False)`` to rounding,
    which goes through ``erfc``: XLA:CPU expands that into several times the work of ``erf``
    (docs/benchmarks.md, "Attention on CPU")."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype)))


def _drop(x, rate, key):
    keep = flat_random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def transformer_block(num_heads: int, *, num_kv_heads: int | None = None, mlp: str = "gelu",
                      hidden: int | None = None, norm: str = "layer", use_bias: bool = True, causal: bool = True,
                      dropout: float = 0.0, rope: bool = False, eps: float = 1e-5, w_init=None,
                      out_init=None, dtype=jnp.float32) -> Layer:
    """A pre-norm block on (B, T, C): attention then an MLP, each added to the residual stream.

    ``mlp="gelu"``: ``proj(gelu(fc(x)))`` with exact GELU and ``hidden``
    (default ``4 C``) units; ``"swiglu"``: ``proj(silu(gate(x)) * up(x))`` with
    ``hidden`` (default ``int(8 C / 3)``).  ``norm``: ``"layer"`` (LayerNorm, bias
    if ``use_bias``) or ``"rms"``.  ``dropout``: on the attention weights and
    on each branch's output before it is added (nanoGPT's three dropouts).
    ``w_init``: the attention's input projections and the MLP's first layer(s);
    ``out_init``: the two projections back into the residual stream (GPT-2
    scales these by ``1 / sqrt(2 * layers)``).  Both LeCun normal by default.

    Params: ``norm_1``, ``attention`` (:func:`fundl.nn.multi_head_attention`),
    ``norm_2`` and ``mlp`` (``fc``/``proj``, or ``gate``/``up``/``proj``).

    Examples:
        >>> block = nn.transformer_block(4, dropout=0.1)
        >>> params, _, out_shape = block.init(jax.random.key(0), (2, 10, 32))
        >>> sorted(params), sorted(params["mlp"]), params["mlp"]["fc"]["w"].shape, out_shape
        (['attention', 'mlp', 'norm_1', 'norm_2'], ['fc', 'proj'], (32, 128), (2, 10, 32))
    """
    if mlp not in MLPS:
        raise ValueError(f"transformer_block: mlp must be one of {list(MLPS)}, got {mlp!r}")
    if norm not in NORMS:
        raise ValueError(f"transformer_block: norm must be one of {list(NORMS)}, got {norm!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"transformer_block: dropout is a drop probability in [0, 1), got {dropout}")
    w_init = w_init or initializers.lecun_normal()
    out_init = out_init or w_init
    attention = multi_head_attention(num_heads, num_kv_heads=num_kv_heads, use_bias=use_bias, causal=causal,
                                     dropout=dropout, rope=rope, w_init=w_init, out_init=out_init, dtype=dtype)
    make_norm = (lambda: layer_norm(eps=eps, use_bias=use_bias, dtype=dtype)) if norm == "layer" else \
        (lambda: rms_norm(eps=eps, dtype=dtype))
    norm_1, norm_2 = make_norm(), make_norm()
    name = "transformer_block"

    def dense_params(key, fan_in, fan_out, init_fn):
        p = {"w": init_fn(key, (fan_in, fan_out), dtype)}
        if use_bias:
            p["b"] = jnp.zeros((fan_out,), dtype)
        return p

    def linear(p, x):
        y = matmul(x, get_param(p, "w").astype(x.dtype))
        return y + get_param(p, "b").astype(x.dtype) if use_bias else y

    def init(key, input_shape):
        x_shape = tuple(get_param(input_shape, "x", "input shape")) if isinstance(input_shape, dict) \
            else tuple(input_shape)
        if len(x_shape) != 3:
            raise ShapeError(f"{name} expected x of shape (batch, time, features), got {format_shape(x_shape)}")
        c = x_shape[-1]
        h = hidden or (4 * c if mlp == "gelu" else int(8 * c / 3))
        keys = jax.random.split(key, 6)
        att_shape = {**input_shape, "x": x_shape} if isinstance(input_shape, dict) else x_shape
        params = {"norm_1": norm_1.init(keys[0], x_shape)[0], "attention": attention.init(keys[1], att_shape)[0],
                  "norm_2": norm_2.init(keys[2], x_shape)[0]}
        if mlp == "gelu":
            params["mlp"] = {"fc": dense_params(keys[3], c, h, w_init)}
        else:
            params["mlp"] = {"gate": dense_params(keys[3], c, h, w_init), "up": dense_params(keys[4], c, h, w_init)}
        params["mlp"]["proj"] = dense_params(keys[5], h, c, out_init)
        params = {k: v for k, v in params.items() if v}  # a norm without scale or bias holds nothing
        return params, {}, input_shape if isinstance(input_shape, dict) else x_shape

    def mlp_apply(p, x):
        if mlp == "gelu":
            return linear(p["proj"], exact_gelu(linear(p["fc"], x)))
        return linear(p["proj"], jax.nn.silu(linear(p["gate"], x)) * linear(p["up"], x))

    def apply(params, state, x, *, key=None, train=False):
        inputs = x
        x = inputs["x"] if isinstance(inputs, dict) else inputs
        if jnp.ndim(x) != 3:
            raise ShapeError(f"{name} expected x of shape (batch, time, features), got shape {format_shape(jnp.shape(x))}")
        drop = train and dropout > 0
        if drop and key is None:
            raise KeyMissingError(f"{name} with dropout in training mode needs a PRNG key: call "
                                  "apply(params, state, x, key=jax.random.key(...), train=True), or pass train=False")
        keys = jax.random.split(key, 3) if drop else (None, None, None)
        h = norm_1.apply(params.get("norm_1", {}), {}, x)[0]
        att_in = {**inputs, "x": h} if isinstance(inputs, dict) else h
        a = attention.apply(get_param(params, "attention"), {}, att_in, key=keys[0], train=train)[0]
        x = x + (_drop(a, dropout, keys[1]) if drop else a)
        m = mlp_apply(get_param(params, "mlp"), norm_2.apply(params.get("norm_2", {}), {}, x)[0])
        x = x + (_drop(m, dropout, keys[2]) if drop else m)
        return ({**inputs, "x": x} if isinstance(inputs, dict) else x), {}

    def init_cache(params, batch_size, max_len, dtype_=jnp.float32):
        return attention.decoder.init_cache(get_param(params, "attention"), batch_size, max_len, dtype_)

    def step(params, cache, x, position):
        h = norm_1.apply(params.get("norm_1", {}), {}, x)[0]
        a, cache = attention.decoder.step(get_param(params, "attention"), cache, h, position)
        x = x + a
        return x + mlp_apply(get_param(params, "mlp"), norm_2.apply(params.get("norm_2", {}), {}, x)[0]), cache

    return Layer(init, apply, name, decoder=Decoder(init_cache, step))

