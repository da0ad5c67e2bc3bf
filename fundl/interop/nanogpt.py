"""nanoGPT's weights as a :func:`fundl.models.gpt` and its params.

``from_nanogpt(state_dict, heads)`` reads the ``state_dict`` of nanoGPT's
``GPT`` (``karpathy/nanoGPT``, ``model.py``): the ``"model"`` entry of its
``ckpt.pt``, torch tensors or NumPy arrays, with or without the
``_orig_mod.`` prefix ``torch.compile`` adds.  The sizes come from the
tensors (vocabulary and width from ``wte``, context from ``wpe``, layers from
the block count, ``bias`` from whether the biases are there); only the head
count is not stored, so it is an argument.  nanoGPT's ``nn.Linear`` keeps
its weight as (out, in); fundl's dense weight is (in, out): each is transposed.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from fundl import models
from fundl.nn import Layer

__all__ = ["from_nanogpt", "NanoGPTStateError"]

_PREFIX = "_orig_mod."
# Buffers some nanoGPT versions store beside the weights: the causal mask of
# the attention without flash (``attn.bias``, (1, 1, T, T)) and GPT-2's ``masked_bias``.
_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class NanoGPTStateError(ValueError):
    """A state_dict that is not a nanoGPT GPT's: a missing tensor, an unexpected one, or a wrong shape."""


def _array(value) -> np.ndarray:
    """A float32 NumPy array of a torch tensor (any dtype or device) or an array."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _get(sd: dict, name: str, shape: tuple | None = None) -> np.ndarray:
    if name not in sd:
        raise NanoGPTStateError(f"nanoGPT state_dict: expected a tensor '{name}', got none; it has "
                                f"{len(sd)} tensors, e.g. {sorted(sd)[:6]}")
    a = _array(sd.pop(name))
    if shape is not None and a.shape != shape:
        raise NanoGPTStateError(f"nanoGPT state_dict: expected '{name}' of shape {shape}, got {a.shape}")
    return a


def _linear(sd: dict, prefix: str, fan_in: int, fan_out: int, bias: bool) -> dict:
    p = {"w": _get(sd, f"{prefix}.weight", (fan_out, fan_in)).T.copy()}
    if bias:
        p["b"] = _get(sd, f"{prefix}.bias", (fan_out,))
    return p


def _norm(sd: dict, prefix: str, width: int, bias: bool) -> dict:
    p = {"scale": _get(sd, f"{prefix}.weight", (width,))}
    if bias:
        p["bias"] = _get(sd, f"{prefix}.bias", (width,))
    return p


def from_nanogpt(state_dict, heads: int, *, dropout: float = 0.0) -> tuple[Layer, dict]:
    """``(model, params)``: a :func:`fundl.models.gpt` with nanoGPT's sizes and its weights.

    ``state_dict``: nanoGPT's ``model.state_dict()`` or ``torch.load("ckpt.pt")["model"]``
    (a whole checkpoint dict with a ``"model"`` entry is accepted too); ``heads``:
    its ``n_head``.  ``model.apply(params, {}, ids)`` gives nanoGPT's logits for
    every position (nanoGPT's ``forward`` without targets returns the last one only).
    A tensor missing, left over, or of the wrong shape is a :class:`NanoGPTStateError`.

    Examples:
        >>> from fundl.interop import from_nanogpt
        >>> rng = np.random.default_rng(0)
        >>> sd = {"transformer.wte.weight": rng.normal(size=(11, 8)), "transformer.wpe.weight": rng.normal(size=(6, 8)),
        ...       "transformer.ln_f.weight": np.ones(8)}
        >>> for name, shape in [("ln_1", (8,)), ("attn.c_attn", (24, 8)), ("attn.c_proj", (8, 8)), ("ln_2", (8,)),
        ...                     ("mlp.c_fc", (32, 8)), ("mlp.c_proj", (8, 32))]:
        ...     sd[f"transformer.h.0.{name}.weight"] = rng.normal(size=shape)
        >>> model, params = from_nanogpt(sd, heads=2)                # bias=False: no bias tensors
        >>> model.apply(params, {}, jnp.zeros((1, 6), jnp.int32))[0].shape
        (1, 6, 11)
    """
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    sd = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in dict(state_dict).items()}
    sd = {k: v for k, v in sd.items() if not _BUFFERS.search(k)}
    wte = _get(sd, "transformer.wte.weight")
    if wte.ndim != 2:
        raise NanoGPTStateError(f"nanoGPT state_dict: expected 'transformer.wte.weight' of shape (vocab, width), "
                                f"got {wte.shape}")
    vocab, width = wte.shape
    wpe = _get(sd, "transformer.wpe.weight")
    if wpe.ndim != 2 or wpe.shape[1] != width:
        raise NanoGPTStateError(f"nanoGPT state_dict: expected 'transformer.wpe.weight' of shape (context, {width}), "
                                f"got {wpe.shape}")
    if not isinstance(heads, int) or heads <= 0 or width % heads:
        raise NanoGPTStateError(f"from_nanogpt: heads must be a positive int dividing the width {width}, got {heads!r}")
    head = sd.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(_array(head), wte):
        raise NanoGPTStateError("nanoGPT state_dict: 'lm_head.weight' differs from 'transformer.wte.weight'; "
                                "fundl's GPT ties them, as nanoGPT does")
    layers = len({m.group(1) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k))})
    bias = "transformer.ln_f.bias" in sd
    params = {"embedding": {"w": wte}, "positions": {"w": wpe}}
    for i in range(layers):
        h = f"transformer.h.{i}"
        params[f"block_{i}"] = {
            "norm_1": _norm(sd, f"{h}.ln_1", width, bias),
            "attention": {"qkv": _linear(sd, f"{h}.attn.c_attn", width, 3 * width, bias),
                          "out": _linear(sd, f"{h}.attn.c_proj", width, width, bias)},
            "norm_2": _norm(sd, f"{h}.ln_2", width, bias),
            "mlp": {"fc": _linear(sd, f"{h}.mlp.c_fc", width, 4 * width, bias),
                    "proj": _linear(sd, f"{h}.mlp.c_proj", 4 * width, width, bias)},
        }
    params["norm"] = _norm(sd, "transformer.ln_f", width, bias)
    if sd:
        raise NanoGPTStateError(f"nanoGPT state_dict: unexpected tensors {sorted(sd)} (a GPT of {layers} layers, "
                                f"bias={bias}, has none of these)")
    if layers == 0:
        raise NanoGPTStateError("nanoGPT state_dict: expected blocks 'transformer.h.0. ...', got none")
    model = models.gpt(vocab, context=wpe.shape[0], layers=layers, heads=heads, width=width, dropout=dropout,
                       bias=bias)
    return model, jax.tree.map(jnp.asarray, params)
