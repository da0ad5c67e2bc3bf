"""fundl.models.gpt against a small GPT written here in PyTorch with nanoGPT's parameter names
(loaded through fundl.interop.from_nanogpt), its initialisation, and fundl.generate: greedy
tokens equal recomputing the context at every step (GPT and the LSTM char LM), sampling draws
from the top k."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl
from fundl import models
from fundl.generation import GenerationError
from fundl.interop import NanoGPTStateError, from_nanogpt

VOCAB, CONTEXT, LAYERS, HEADS, WIDTH = 13, 8, 2, 2, 16


def torch_gpt(torch, *, bias: bool, seed: int = 0):
    """A GPT in PyTorch with nanoGPT's module names (so its state_dict is nanoGPT's) and its math:
    pre-norm blocks, causal attention from one fused q/k/v projection, a 4x exact-GELU MLP, a tied head."""
    tnn, F = torch.nn, torch.nn.functional
    torch.manual_seed(seed)

    class Attention(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = tnn.Linear(WIDTH, 3 * WIDTH, bias=bias)
            self.c_proj = tnn.Linear(WIDTH, WIDTH, bias=bias)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = (a.view(b, t, HEADS, c // HEADS).transpose(1, 2) for a in self.c_attn(x).split(WIDTH, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, c))

    class MLP(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = tnn.Linear(WIDTH, 4 * WIDTH, bias=bias)
            self.c_proj = tnn.Linear(4 * WIDTH, WIDTH, bias=bias)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = tnn.LayerNorm(WIDTH, bias=bias), Attention()
            self.ln_2, self.mlp = tnn.LayerNorm(WIDTH, bias=bias), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = tnn.ModuleDict(dict(
                wte=tnn.Embedding(VOCAB, WIDTH), wpe=tnn.Embedding(CONTEXT, WIDTH),
                h=tnn.ModuleList([Block() for _ in range(LAYERS)]), ln_f=tnn.LayerNorm(WIDTH, bias=bias)))
            self.lm_head = tnn.Linear(WIDTH, VOCAB, bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx):
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
            for block in self.transformer.h:
                x = block(x)
            return self.lm_head(self.transformer.ln_f(x))

    model = GPT()
    with torch.no_grad():  # norms and biases away from their init, so a mix-up would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


IDS = np.random.default_rng(0).integers(0, VOCAB, (3, CONTEXT))


@pytest.mark.parametrize("bias", [True, False])
def test_from_nanogpt_gives_nanogpts_logits(bias):
    torch = pytest.importorskip("torch")
    ref = torch_gpt(torch, bias=bias)
    model, params = from_nanogpt(ref.state_dict(), heads=HEADS)
    want = ref(torch.from_numpy(IDS)).detach().numpy()
    got = np.asarray(jax.jit(lambda p, x: model.apply(p, {}, x)[0])(params, jnp.asarray(IDS)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert ("b" in params["block_0"]["mlp"]["fc"]) == bias


def test_from_nanogpt_takes_compiled_checkpoints_numpy_and_names_what_is_wrong():
    torch = pytest.importorskip("torch")
    sd = torch_gpt(torch, bias=False).state_dict()
    compiled = {"_orig_mod." + k: v.numpy() for k, v in sd.items()}
    compiled["_orig_mod.transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, CONTEXT, CONTEXT)))  # a mask buffer
    model, params = from_nanogpt({"model": compiled, "iter_num": 5}, heads=HEADS)   # a whole ckpt.pt dict
    _, reference = from_nanogpt(sd, heads=HEADS)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    with pytest.raises(NanoGPTStateError, match="transformer.h.1.mlp.c_fc.weight"):
        from_nanogpt({k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.weight"}, heads=HEADS)
    with pytest.raises(NanoGPTStateError, match="unexpected tensors.*extra"):
        from_nanogpt({**sd, "extra.weight": np.zeros(3)}, heads=HEADS)
    with pytest.raises(NanoGPTStateError, match="heads must"):
        from_nanogpt(sd, heads=3)


@pytest.mark.slow
def test_gpt_initialisation_is_nanogpts():
    model = models.gpt(64, context=16, layers=4, heads=2, width=64)
    params, state, _ = jax.jit(model.init, static_argnums=1)(jax.random.key(0), (1, 16))
    assert state == {}
    block = params["block_0"]
    for w in (params["embedding"]["w"], params["positions"]["w"], block["attention"]["qkv"]["w"],
              block["mlp"]["fc"]["w"]):
        assert float(jnp.std(w)) == pytest.approx(0.02, rel=0.05)
    for w in (block["attention"]["out"]["w"], block["mlp"]["proj"]["w"]):   # residual projections
        assert float(jnp.std(w)) == pytest.approx(0.02 / np.sqrt(2 * 4), rel=0.05)
    assert float(jnp.abs(block["attention"]["qkv"]["b"]).max()) == 0.0
    np.testing.assert_array_equal(block["norm_1"]["scale"], 1.0)


# ------------------------------------------------------------------ generation
@functools.lru_cache(maxsize=None)
def lm(kind: str):
    """(model, params) shared by the generation tests; weights scaled up so greedy choices are clear."""
    model = {"gpt": models.gpt(VOCAB, context=CONTEXT, layers=LAYERS, heads=HEADS, width=WIDTH),
             "lstm": models.char_lm(VOCAB, embed_dim=8, hidden=16, num_layers=2),
             "gru": models.char_lm(VOCAB, embed_dim=8, hidden=16, cell="gru")}[kind]
    params, _, _ = jax.jit(model.init, static_argnums=1)(jax.random.key(0), (1, CONTEXT))
    return model, jax.tree.map(lambda a: a * 4 if a.ndim == 2 else a, params)


def logits_by_recomputing(model, params, out, position, context):
    """The logits after ``out[:, :position]``: the model run on the whole (last ``context``) tokens,
    padded to a fixed length so one compiled program serves every step (the model is causal)."""
    start = 0 if context is None else max(0, position - context)
    width = context or out.shape[1]
    buf = np.zeros((out.shape[0], width), np.int32)
    buf[:, :position - start] = out[:, start:position]
    return np.asarray(_apply(model, params, buf))[:, position - start - 1]


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, ids):
    return model.apply(params, {}, ids)[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "lstm", "gru"])
def test_greedy_generation_equals_recomputing_the_context_each_step(kind):
    """GPT: 3 prompt + 10 new tokens with a context of 8, so the KV cache fills and nanoGPT's crop
    (the last 8 tokens recomputed) takes over; the char LMs: the carry as the cache."""
    model, params = lm(kind)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    out = np.asarray(fundl.generate(model, params, prompt, 10, key=jax.random.key(0), temperature=0.0))
    assert out.shape == (2, 13) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :3], prompt)
    context = CONTEXT if kind == "gpt" else None
    for t in range(3, 13):
        np.testing.assert_array_equal(out[:, t], logits_by_recomputing(model, params, out, t, context).argmax(-1))


@pytest.mark.slow
def test_generation_with_a_prompt_longer_than_the_context_crops_it():
    model, params = lm("gpt")
    prompt = np.random.default_rng(1).integers(0, VOCAB, (1, CONTEXT + 3)).astype(np.int32)
    out = np.asarray(fundl.generate(model, params, prompt, 3, key=jax.random.key(0), temperature=0.0))
    for t in range(CONTEXT + 3, CONTEXT + 6):
        np.testing.assert_array_equal(out[:, t], logits_by_recomputing(model, params, out, t, CONTEXT).argmax(-1))


@pytest.mark.slow
def test_sampling_draws_from_the_top_k_and_is_reproducible():
    model, params = lm("gpt")
    prompt = np.zeros((4, 2), np.int32)
    draw = lambda seed: np.asarray(fundl.generate(model, params, prompt, 6, key=jax.random.key(seed), top_k=2))
    out = draw(0)
    np.testing.assert_array_equal(out, draw(0))
    assert not np.array_equal(out, draw(1))
    for t in range(2, 8):
        top2 = np.argsort(logits_by_recomputing(model, params, out, t, CONTEXT), axis=-1)[:, -2:]
        assert all(out[i, t] in top2[i] for i in range(4))


def test_generate_checks_its_arguments():
    model, params = lm("gru")
    with pytest.raises(GenerationError, match="integer ids of shape"):
        fundl.generate(model, params, np.zeros((3,), np.int32), 2, key=jax.random.key(0))
    with pytest.raises(GenerationError, match="temperature"):
        fundl.generate(model, params, np.zeros((1, 2), np.int32), 2, key=jax.random.key(0), temperature=-1.0)
    with pytest.raises(GenerationError, match="top_k"):
        fundl.generate(model, params, np.zeros((1, 2), np.int32), 2, key=jax.random.key(0), top_k=0)
    with pytest.raises(fundl.nn.LayerError, match="has no decoder"):
        fundl.generate(models.mlp([4], 3), {}, np.zeros((1, 2), np.int32), 2, key=jax.random.key(0))


def test_config_builds_the_gpt_with_the_datas_context():
    from fundl.run import config as cfg
    from fundl.run.build import build_model

    config = cfg.load_config(None, ['model.kind="gpt"', "model.layers=1", "model.heads=2", "model.width=8",
                                    "model.bias=false", "data.seq_len=12"])
    model = build_model(config["model"], VOCAB, context=config["data"]["seq_len"])
    params, state, out = fundl.nn.abstract_init(model, (1, 12))
    assert state == {} and out == (1, 12, VOCAB) and params["positions"]["w"].shape == (12, 8)
    assert sorted(params) == ["block_0", "embedding", "norm", "positions"] and "bias" not in params["norm"]
    with pytest.raises(cfg.ConfigError, match="model.heads = 3 must divide model.width = 8"):
        cfg.load_config(None, ['model.kind="gpt"', "model.heads=3", "model.width=8"])


@pytest.mark.slow
def test_generation_is_one_loop_that_updates_the_cache_in_place():
    """The compiled program: one while loop, and no copy of a cache-sized array (the KV cache is
    written with dynamic-update-slice where it lies)."""
    from fundl.generation import decode_loop

    model, params = lm("gpt")
    text = decode_loop.lower(model.decoder, params, jnp.zeros((1, 3), jnp.int32), jax.random.key(0),
                                   jnp.float32(1.0), num_tokens=5, greedy=True, top_k=None).compile().as_text()
    cache = f"f32[1,{CONTEXT},{HEADS},{WIDTH // HEADS}]"
    lines = text.splitlines()
    assert text.count(" while(") == 1
    assert any("dynamic-update-slice" in line and cache in line for line in lines)
    assert not [line for line in lines if " copy(" in line and cache in line]
