"""PyTorch weights in fundl (fundl.interop.torch): ported nn.LSTM/nn.GRU compute what torch computes,
stacked, bidirectional and with packed sequences, and fundl's default init matches torch's bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import nn
from fundl.interop import gru_params_from_torch, lstm_params_from_torch

KEY = jax.random.key(0)
B, T, F, H = 3, 5, 4, 6


def rand(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# --------------------------------------------------------------------------
# Initialisation: fundl's default against torch's modules


@pytest.mark.slow
def test_default_init_bounds_match_torch_modules():
    torch = pytest.importorskip("torch")
    h, f = 32, 7
    torch.manual_seed(0)
    t_lstm, t_gru = torch.nn.LSTM(f, h), torch.nn.GRU(f, h)
    ours_lstm = lstm_params_from_torch({k: v.detach().numpy() for k, v in t_lstm.state_dict().items()})
    p = nn.lstm_cell(h, forget_bias=0.0).init(KEY, f)
    # same bounds: weights within 1/sqrt(H), summed bias within 2/sqrt(H)
    for ours, theirs in [(p["w"], ours_lstm["w"]), (p["b"], ours_lstm["b"])]:
        bound = float(np.abs(theirs).max())
        assert float(np.abs(ours).max()) <= (1 / math.sqrt(h) if ours.ndim == 2 else 2 / math.sqrt(h))
        assert 0.8 < float(np.abs(ours).max()) / bound < 1.25
    g = nn.gru_cell(h).init(KEY, f)
    tg = gru_params_from_torch({k: v.detach().numpy() for k, v in t_gru.state_dict().items()})
    for name in g:
        assert g[name].shape == tg[name].shape
        assert 0.9 < float(np.abs(g[name]).max()) / float(np.abs(tg[name]).max()) < 1.1


# --------------------------------------------------------------------------
# PyTorch numerics


def _torch_module(torch, kind, num_layers, bidirectional, f=F, h=H):
    torch.manual_seed(0)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    return cls(f, h, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)


def _port(kind, sd, num_layers, bidirectional):
    port = lstm_params_from_torch if kind == "lstm" else gru_params_from_torch

    def one(layer):
        if bidirectional:
            return {"forward": port(sd, layer, "forward"), "backward": port(sd, layer, "backward")}
        return port(sd, layer)

    return one(0) if num_layers == 1 else {f"layer_{l}": one(l) for l in range(num_layers)}


def _flat_carries(kind, carries, num_layers, bidirectional):
    """Our carries as torch's (h_n, c_n) stacks of shape (L * D, B, H)."""
    per_layer = [carries] if num_layers == 1 else list(carries)
    per_dir = [c for layer in per_layer for c in (layer if bidirectional else [layer])]
    if kind == "lstm":
        return np.stack([c[0] for c in per_dir]), np.stack([c[1] for c in per_dir])
    return np.stack(per_dir), None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (1, True), (2, True)])
def test_matches_torch(kind, num_layers, bidirectional):
    torch = pytest.importorskip("torch")
    m = _torch_module(torch, kind, num_layers, bidirectional)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    params = _port(kind, sd, num_layers, bidirectional)
    layer = (nn.lstm if kind == "lstm" else nn.gru)(
        H, num_layers=num_layers, bidirectional=bidirectional, return_carry=True)
    _, _, out_shape = layer.init(KEY, (B, T, F))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, layer.init(KEY, (B, T, F))[0])
    x = rand(16, B, T, F)
    (ys, carries), _ = jax.jit(lambda p, x: layer.apply(p, {}, x))(params, jnp.asarray(x))
    with torch.no_grad():
        t_ys, t_state = m(torch.from_numpy(x))
    np.testing.assert_allclose(ys, t_ys.numpy(), atol=1e-5)
    h_n, c_n = _flat_carries(kind, carries, num_layers, bidirectional)
    if kind == "lstm":
        np.testing.assert_allclose(h_n, t_state[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(c_n, t_state[1].numpy(), atol=1e-5)
    else:
        np.testing.assert_allclose(h_n, t_state.numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lengths_match_torch_packed_sequences(kind):
    torch = pytest.importorskip("torch")
    m = _torch_module(torch, kind, 2, True)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    params = _port(kind, sd, 2, True)
    layer = (nn.lstm if kind == "lstm" else nn.gru)(H, num_layers=2, bidirectional=True, return_carry=True)
    lengths = [5, 2, 4]
    x = rand(17, B, T, F)
    (ys, carries), _ = layer.apply(params, {}, (jnp.asarray(x), jnp.array(lengths)))
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(x), torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        t_out, t_state = m(packed)
    t_ys, _ = torch.nn.utils.rnn.pad_packed_sequence(t_out, batch_first=True, total_length=T)
    np.testing.assert_allclose(ys, t_ys.numpy(), atol=1e-5)
    h_n, _ = _flat_carries(kind, carries, 2, True)
    np.testing.assert_allclose(h_n, (t_state[0] if kind == "lstm" else t_state).numpy(), atol=1e-5)
