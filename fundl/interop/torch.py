"""Weights from PyTorch modules as fundl params.

``torch.nn.LSTM``/``torch.nn.GRU`` state dicts become the params of
:func:`fundl.nn.lstm_cell`/:func:`fundl.nn.gru_cell`, whose equations, gate
order and initialisation follow PyTorch's, so a ported model computes what
the torch module computes (to float32 precision).  Nothing here imports
torch: state dicts come in as NumPy arrays (a torch tensor is accepted and
copied), and the caller loads them (``torch.load(..., weights_only=True)``
never runs code from the file).

Examples:
    >>> from fundl.interop.torch import gru_params_from_torch
    >>> H, F = 4, 3                                       # torch.nn.GRU(3, 4)'s tensors, as NumPy
    >>> sd = {"weight_ih_l0": np.ones((3 * H, F)), "weight_hh_l0": np.ones((3 * H, H)),
    ...       "bias_ih_l0": np.zeros(3 * H), "bias_hh_l0": np.zeros(3 * H)}
    >>> params = gru_params_from_torch(sd)
    >>> jax.tree.map(jnp.shape, params)
    {'b_hh': (12,), 'b_ih': (12,), 'w_hh': (4, 12), 'w_ih': (3, 12)}
    >>> y, _ = nn.gru(H).apply(params, {}, jnp.ones((2, 5, F)))   # torch's GRU with these weights
    >>> y.shape
    (2, 5, 4)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["lstm_params_from_torch", "gru_params_from_torch"]


def _torch_get(sd, name):
    if name not in sd:
        raise KeyError(f"state dict has no '{name}'; it has {sorted(sd)}")
    v = sd[name]
    if hasattr(v, "detach"):  # a torch tensor slipped in: accept it
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float32)


def _torch_suffix(layer: int, direction: int | str) -> str:
    if direction in (0, "forward", "fwd"):
        return f"_l{layer}"
    if direction in (1, "backward", "bwd", "reverse"):
        return f"_l{layer}_reverse"
    raise ValueError(f"direction must be 'forward'/0 or 'backward'/1, got {direction!r}")


def lstm_params_from_torch(state_dict, layer: int = 0, direction: int | str = "forward") -> dict:
    """fundl LSTM cell params from a ``torch.nn.LSTM`` state dict (NumPy arrays in).

    ``state_dict`` maps torch's names (``weight_ih_l0``, ``weight_hh_l0``,
    ``bias_ih_l0``, ``bias_hh_l0``, with ``_reverse`` for the backward
    direction) to arrays, e.g. ``{k: v.numpy() for k, v in m.state_dict().items()}``.
    Returns ``{"w": concat([W_ih.T, W_hh.T]), "b": b_ih + b_hh}``.
    A module built with ``bias=False`` gives ``b = 0``.
    """
    s = _torch_suffix(layer, direction)
    w_ih, w_hh = _torch_get(state_dict, "weight_ih" + s), _torch_get(state_dict, "weight_hh" + s)
    if "bias_ih" + s in state_dict:
        b = _torch_get(state_dict, "bias_ih" + s) + _torch_get(state_dict, "bias_hh" + s)
    else:
        b = np.zeros(w_ih.shape[0], np.float32)
    if w_hh.shape[0] != w_hh.shape[1] * 4:
        raise ValueError(f"weight_hh{s} has shape {w_hh.shape}; projections (proj_size) are not supported")
    return {"w": jnp.asarray(np.concatenate([w_ih.T, w_hh.T], 0)), "b": jnp.asarray(b)}


def gru_params_from_torch(state_dict, layer: int = 0, direction: int | str = "forward") -> dict:
    """fundl GRU cell params from a ``torch.nn.GRU`` state dict (NumPy arrays in).

    Returns ``{"w_ih": W_ih.T, "w_hh": W_hh.T, "b_ih": b_ih, "b_hh": b_hh}``
    (zeros for a module built with ``bias=False``).
    """
    s = _torch_suffix(layer, direction)
    w_ih, w_hh = _torch_get(state_dict, "weight_ih" + s), _torch_get(state_dict, "weight_hh" + s)
    if "bias_ih" + s in state_dict:
        b_ih, b_hh = _torch_get(state_dict, "bias_ih" + s), _torch_get(state_dict, "bias_hh" + s)
    else:
        b_ih = b_hh = np.zeros(w_ih.shape[0], np.float32)
    return {"w_ih": jnp.asarray(w_ih.T), "w_hh": jnp.asarray(w_hh.T),
            "b_ih": jnp.asarray(b_ih), "b_hh": jnp.asarray(b_hh)}
