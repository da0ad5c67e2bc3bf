"""Attention and the transformer layers against references: PyTorch's scaled_dot_product_attention,
nn.MultiheadAttention and nn.RMSNorm (within 1e-5; skipped without torch), NumPy for rotary and
learned positions, and each decoder's steps against ``apply`` on the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import nn
from fundl.nn.attention import dot_product_attention
from fundl.nn.positional import apply_rotary
from fundl.nn.transformer import exact_gelu

B, T, S, C = 2, 5, 7, 8
RNG = np.random.default_rng(0)
Q = RNG.normal(size=(B, T, 4, 4)).astype(np.float32)       # (B, T, heads, head_dim)
K = RNG.normal(size=(B, S, 4, 4)).astype(np.float32)
V = RNG.normal(size=(B, S, 4, 4)).astype(np.float32)
MASK = RNG.random((B, T, S)) < 0.7
MASK[..., 0] = True                                         # every query sees a key
LENGTHS = np.array([3, 7], np.int32)


def torch_sdpa(torch, q, k, v, **kw):
    t = lambda a: torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2)))  # (B, heads, T, D)
    y = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), **kw)
    return np.swapaxes(y.numpy(), 1, 2)


@pytest.mark.parametrize("case", ["plain", "causal", "mask", "lengths", "grouped", "multi_query"])
def test_dot_product_attention_matches_torch_sdpa(case):
    torch = pytest.importorskip("torch")
    q, k, v, kw, ref_kw = Q, K, V, {}, {}
    if case == "causal":
        k, v = K[:, :T], V[:, :T]
        kw, ref_kw = {"causal": True}, {"is_causal": True}
    elif case == "mask":
        kw, ref_kw = {"mask": jnp.asarray(MASK)[:, None]}, {"attn_mask": torch.from_numpy(MASK)[:, None]}
    elif case == "lengths":
        padding = np.arange(S)[None, None, None, :] < LENGTHS[:, None, None, None]
        kw, ref_kw = {"lengths": jnp.asarray(LENGTHS)}, {"attn_mask": torch.from_numpy(padding)}
    elif case in ("grouped", "multi_query"):
        kv = 2 if case == "grouped" else 1
        k, v = K[:, :, :kv], V[:, :, :kv]
        ref_kw = {"enable_gqa": True}
    y = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **kw)
    np.testing.assert_allclose(y, torch_sdpa(torch, q, k, v, **ref_kw), atol=1e-5, rtol=1e-5)


def _mha_params_from_torch(mha, cross: bool):
    """fundl's params of a torch nn.MultiheadAttention (batch_first): q, k, v rows as fundl's columns."""
    e = mha.embed_dim
    bias = mha.in_proj_bias.detach().numpy()
    out = {"w": mha.out_proj.weight.detach().numpy().T, "b": mha.out_proj.bias.detach().numpy()}
    if not cross:
        return {"qkv": {"w": mha.in_proj_weight.detach().numpy().T, "b": bias}, "out": out}
    wk, wv = mha.k_proj_weight.detach().numpy(), mha.v_proj_weight.detach().numpy()
    return {"query": {"w": mha.q_proj_weight.detach().numpy().T, "b": bias[:e]},
            "kv": {"w": np.concatenate([wk, wv]).T, "b": bias[e:]}, "out": out}


@pytest.mark.parametrize("case", ["self", "causal", "mask", "padding", "cross", "cross_padding"])
def test_multi_head_attention_matches_torch_multihead_attention(case):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cross = case.startswith("cross")
    mha = torch.nn.MultiheadAttention(C, 2, batch_first=True, kdim=6 if cross else None, vdim=6 if cross else None)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    params = jax.tree.map(jnp.asarray, _mha_params_from_torch(mha, cross))
    x = RNG.normal(size=(B, T, C)).astype(np.float32)
    ctx = RNG.normal(size=(B, S, 6)).astype(np.float32)
    layer = nn.multi_head_attention(2, causal=case == "causal")
    inputs, kw = jnp.asarray(x), {}
    tx = torch.from_numpy(x)
    source = torch.from_numpy(ctx) if cross else tx
    if case == "causal":
        kw = {"attn_mask": torch.triu(torch.ones(T, T, dtype=torch.bool), 1)}    # torch: True = not allowed
    elif case == "mask":
        square = MASK[:, :, :T]
        inputs = {"x": inputs, "mask": jnp.asarray(square)}
        kw = {"attn_mask": torch.from_numpy(~square).repeat_interleave(2, 0)}
    elif case in ("padding", "cross_padding"):
        n = np.minimum(LENGTHS, T if case == "padding" else S)
        inputs = {"x": inputs, "lengths": jnp.asarray(n)}
        kw = {"key_padding_mask": torch.from_numpy(np.arange(source.shape[1])[None] >= n[:, None])}
    if cross:
        inputs = {**(inputs if isinstance(inputs, dict) else {"x": inputs}), "context": jnp.asarray(ctx)}
    y, _ = layer.apply(params, {}, inputs)
    ref, _ = mha(tx, source, source, need_weights=False, **kw)
    np.testing.assert_allclose(y, ref.detach().numpy(), atol=1e-5, rtol=1e-5)


def test_attention_input_errors_name_what_was_expected():
    layer = nn.multi_head_attention(2)
    params, _, _ = layer.init(jax.random.key(0), (1, T, C))
    with pytest.raises(nn.ShapeError, match="boolean attention mask"):
        layer.apply(params, {}, {"x": jnp.ones((1, T, C)), "mask": jnp.ones((T, T))})
    with pytest.raises(nn.ShapeError, match=r"expected a mask of shape \(5, 5\)"):
        layer.apply(params, {}, {"x": jnp.ones((1, T, C)), "mask": jnp.ones((T, 3), bool)})
    with pytest.raises(nn.ShapeError, match="may have"):
        layer.apply(params, {}, {"x": jnp.ones((1, T, C)), "masks": None})
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        nn.multi_head_attention(4, num_kv_heads=3)
    with pytest.raises(nn.KeyMissingError):
        nn.multi_head_attention(2, dropout=0.5).apply(params, {}, jnp.ones((1, T, C)), train=True)


def test_rms_norm_matches_torch():
    torch = pytest.importorskip("torch")
    x = RNG.normal(size=(3, 4, C)).astype(np.float32)
    ref = torch.nn.RMSNorm(C, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    y, _ = nn.rms_norm(eps=1e-6).apply({"scale": jnp.asarray(ref.weight.detach().numpy())}, {}, jnp.asarray(x))
    np.testing.assert_allclose(y, ref(torch.from_numpy(x)).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_exact_gelu_matches_torch_and_jax_nn_values_and_gradients():
    """The transformer MLP's GELU (through erf) is PyTorch's exact GELU and jax.nn.gelu(approximate=False)."""
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-9, 9, 181), RNG.normal(size=200) * 3]).astype(np.float32)
    y, grad, y_jax = jax.jit(lambda a: (exact_gelu(a), jax.grad(lambda b: exact_gelu(b).sum())(a),
                                        jax.nn.gelu(a, approximate=False)))(x)
    tx = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    ty = torch.nn.functional.gelu(tx)
    ty.sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(grad, tx.grad.numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(y, y_jax, atol=2e-6, rtol=1e-6)


def test_rotary_matches_complex_rotation_and_depends_on_relative_position():
    x = RNG.normal(size=(2, 6, 3, 8)).astype(np.float32)
    positions = np.arange(6)
    y = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(positions)))
    theta = 10000.0 ** (-np.arange(4) * 2 / 8)
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * positions[None, :, None, None] * theta)  # pair i: (x_i, x_{i+4})
    np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], -1), atol=1e-5)
    np.testing.assert_allclose(nn.rotary().apply({}, {}, jnp.asarray(x))[0], y, atol=1e-6)
    q, k = RNG.normal(size=(2, 1, 1, 8)).astype(np.float32)
    dot = lambda m, n: float(jnp.sum(apply_rotary(jnp.asarray(q[None]), jnp.array([m]))
                                     * apply_rotary(jnp.asarray(k[None]), jnp.array([n]))))
    assert dot(5, 2) == pytest.approx(dot(13, 10), abs=1e-4) and dot(5, 2) != pytest.approx(dot(5, 3), abs=1e-3)


def test_learned_positions_add_one_row_per_position():
    layer = nn.learned_positions(6)
    params, _, _ = layer.init(jax.random.key(0), (2, 4, 3))
    x = jnp.asarray(RNG.normal(size=(2, 4, 3)), jnp.float32)
    np.testing.assert_allclose(layer.apply(params, {}, x)[0] - x, jnp.broadcast_to(params["w"][:4], (2, 4, 3)),
                               atol=1e-6)
    assert float(params["w"].std()) == pytest.approx(0.02, rel=0.5)
    with pytest.raises(nn.ShapeError, match="<= 6"):
        layer.apply(params, {}, jnp.ones((1, 7, 3)))


@pytest.mark.slow
def test_tied_embedding_head_is_the_tables_transpose_and_gets_both_gradients():
    model = nn.tied_embedding(9, 4, nn.layer_norm())
    params, _, _ = model.init(jax.random.key(0), (1, 3))
    ids = jnp.array([[1, 4, 8]])
    w = params["embedding"]["w"]
    h = nn.layer_norm().apply(params["layer_norm_0"], {}, w[ids])[0]
    np.testing.assert_allclose(model.apply(params, {}, ids)[0], h @ w.T, atol=1e-6)
    assert sorted(params) == ["embedding", "layer_norm_0"]
    # untied, the same numbers: the tied gradient is the sum of the lookup's and the head's
    def untied(w_in, w_out):
        return jnp.sum(jnp.sin(nn.layer_norm().apply(params["layer_norm_0"], {}, w_in[ids])[0] @ w_out.T))
    g_in, g_out = jax.grad(untied, argnums=(0, 1))(w, w)
    g = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply(p, {}, ids)[0])))(params)["embedding"]["w"]
    np.testing.assert_allclose(g, g_in + g_out, atol=1e-6)


def jitted(layer):
    """``layer.apply`` compiled (faster than running its many small ops one by one)."""
    return jax.jit(layer.apply, static_argnames="train")


@pytest.mark.slow
def test_transformer_block_dropout_acts_in_training_only():
    block = nn.transformer_block(2, dropout=0.5)
    params, _, _ = block.init(jax.random.key(0), (1, T, C))
    x = jnp.asarray(RNG.normal(size=(2, T, C)), jnp.float32)
    apply = jitted(block)
    y_eval = apply(params, {}, x)[0]
    y1 = apply(params, {}, x, key=jax.random.key(1), train=True)[0]
    y2 = apply(params, {}, x, key=jax.random.key(1), train=True)[0]
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y_eval)
    np.testing.assert_allclose(jitted(nn.transformer_block(2))(params, {}, x)[0], y_eval, atol=1e-6)


DECODING = {
    "attention_causal": (nn.multi_head_attention(4, num_kv_heads=2, causal=True), (B, 6, C), jnp.float32),
    "attention_rope": (nn.multi_head_attention(2, causal=True, rope=True), (B, 6, C), jnp.float32),
    "block_swiglu_rms_rope": (nn.transformer_block(4, num_kv_heads=1, mlp="swiglu", norm="rms", rope=True),
                              (B, 6, C), jnp.float32),
    "tied_gpt_like": (nn.tied_embedding(11, C, nn.learned_positions(6), nn.transformer_block(2),
                                        nn.layer_norm()), (B, 6), jnp.int32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DECODING))
def test_decoder_steps_equal_apply_on_the_whole_sequence(name):
    layer, shape, dtype = DECODING[name]
    params, _, _ = jax.jit(layer.init, static_argnums=1)(jax.random.key(0), shape)
    x = RNG.integers(0, 11, shape) if dtype == jnp.int32 else RNG.normal(size=shape)
    x = jnp.asarray(x, dtype)
    want = jitted(layer)(params, {}, x)[0]
    cache = layer.decoder.init_cache(params, B, 6, jnp.float32)
    step, pieces = jax.jit(layer.decoder.step), []
    for start, stop in ((0, 3), (3, 4), (4, 5), (5, 6)):         # a prefill, then one position at a time
        y, cache = step(params, cache, x[:, start:stop], start)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), want, atol=1e-5, rtol=1e-5)
