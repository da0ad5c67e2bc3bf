"""The GPT (``fundl.models.gpt``) under fundl's transforms, each against a reference:

ensembles and sweeps (vmapped members against the same runs one at a time), per-example gradients and
DP-SGD (against a Python loop of single-example gradients: no batch coupling), remat per block (the
same values and gradients, a checkpoint per block in the program), bfloat16 compute (bfloat16 matmuls,
float32 master params, the float32 loss within bfloat16's rounding) and sharding and FSDP on 4 fake CPU
devices, including the partition rules of docs/parallel.md for a data x model mesh (against one device).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT
from test_parallel import clean_env

from fundl import models
from fundl.losses import softmax_cross_entropy
from fundl.train.ensemble import member, stack_states
from fundl.train.optim import make_optimizer, set_hyperparams
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step
from fundl.transforms import make_dp_train_step, model_loss, per_example_grads

VOCAB, T, B = 11, 8, 4
SIZES = {"context": T, "layers": 2, "heads": 2, "width": 16}


def tiny_gpt(**kw):
    return models.gpt(VOCAB, **SIZES, **kw)


def batch(seed=0, n=B):
    ids = jax.random.randint(jax.random.key(seed), (n, T + 1), 0, VOCAB)
    return {"x": ids[:, :-1], "y": ids[:, 1:]}


def close(a, b, rtol=1e-5, atol=1e-6, msg=""):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol,
                                   err_msg=f"{msg} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def gpt():
    model = tiny_gpt()
    params = jax.jit(lambda k: model.init(k, (1, T))[0])(jax.random.key(0))
    return model, params


# ------------------------------------------------------------- ensembles and sweeps
@pytest.mark.slow  # two programs compiled: seconds
def test_an_ensemble_and_sweep_of_gpts_equals_its_members_trained_alone(gpt):
    """Two members in one vmapped program, differing in seed (initialisation, data) and learning rate
    (in the optimiser state: optax.inject_hyperparams, as a config's sweep does); each equals the same
    optimiser stepped alone from its own state."""
    from fundl.run.config import validate
    from fundl.run.optimizer import optimizer_from_config

    model, _ = gpt
    config = validate({"optimizer": {"name": "adamw", "b2": 0.99, "weight_decay": 0.1, "decay_matrices_only": True}})
    opt = optimizer_from_config(config, 10, inject=("learning_rate",))
    rates = (1e-2, 3e-3)
    members = []
    for seed, lr in enumerate(rates):
        s = create_train_state(model, opt, jax.random.key(seed), (1, T))
        members.append(s.replace(opt_state=set_hyperparams(s.opt_state, learning_rate=lr)))
    batches = [batch(1), batch(2)]
    vstep = jax.jit(jax.vmap(make_train_step(model, opt)))
    ens = stack_states(members)
    for _ in range(2):
        ens, _ = vstep(ens, jax.tree.map(lambda *b: jnp.stack(b), *batches))
    step = jax.jit(make_train_step(model, opt))
    for i, s in enumerate(members):
        for _ in range(2):
            s, _ = step(s, batches[i])
        close(member(ens, i).params, s.params, atol=1e-5, msg=f"member {i}")  # Adam: rounding of ~0 gradients
    assert not np.allclose(member(ens, 0).params["embedding"]["w"], member(ens, 1).params["embedding"]["w"])


# ------------------------------------------------------ per-example gradients and DP-SGD
@pytest.fixture(scope="module")
def looped(gpt):
    """Each example's gradient on its own (a batch of one), by a Python loop: the reference."""
    model, params = gpt
    loss = model_loss(model)
    one = jax.jit(jax.grad(lambda p, ex: loss(p, ex, model_state={})[0]))
    data = batch(3)
    return data, [one(params, jax.tree.map(lambda a: a[i:i + 1], data)) for i in range(B)]


@pytest.mark.slow  # two programs compiled: seconds
def test_per_example_gradients_of_a_gpt_equal_a_loop(gpt, looped):
    model, params = gpt
    data, reference = looped
    grads, _ = jax.jit(lambda p, b: per_example_grads(model_loss(model), p, b, model_state={}))(params, data)
    for i in range(B):
        close(jax.tree.map(lambda g: g[i], grads), reference[i], rtol=1e-4, atol=1e-6, msg=f"example {i}")
    # no coupling: example 0's gradient does not move when the other examples change
    other = {k: v.at[1:].set((v[1:] + 1) % VOCAB) for k, v in data.items()}
    grads2, _ = jax.jit(lambda p, b: per_example_grads(model_loss(model), p, b, model_state={}))(params, other)
    close(jax.tree.map(lambda g: g[0], grads2), reference[0], rtol=1e-4, atol=1e-6, msg="example 0, others changed")


@pytest.mark.slow  # a DP-SGD step compiled: seconds
def test_a_dp_sgd_step_of_a_gpt_is_the_clipped_mean_by_hand(gpt, looped):
    model, params = gpt
    data, reference = looped
    lr, clip = 0.5, 0.05
    opt = optax.sgd(lr)
    state = create_train_state(model, opt, jax.random.key(0), (1, T)).replace(params=params)
    step = jax.jit(make_dp_train_step(model, opt, clip_norm=clip, noise_multiplier=0.0, expected_batch_size=B))
    new, metrics = step(state, data)
    norms = [float(optax.tree.norm(g)) for g in reference]
    assert min(norms) > clip and float(metrics["clipped"]) == 1.0  # every example clipped
    mean = jax.tree.map(lambda *g: sum(x * clip / n for x, n in zip(g, norms)) / B, *reference)
    close(new.params, jax.tree.map(lambda p, g: p - lr * g, params, mean), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------- remat
@pytest.mark.slow  # two gradient programs compiled: seconds
def test_remat_per_block_keeps_values_and_gradients(gpt):
    model, params = gpt
    remat = tiny_gpt(remat=True)
    data = batch(4)

    def loss(m):
        return lambda p: jnp.mean(softmax_cross_entropy(m.apply(p, {}, data["x"])[0], data["y"]))

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (model, remat))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    close(g1, g0, rtol=1e-5, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(params))
    assert jaxpr.count("remat2[") == SIZES["layers"]  # one recomputation per block (jax.checkpoint's primitive)
    assert "remat2[" not in str(jax.make_jaxpr(jax.grad(loss(model)))(params))


# ------------------------------------------------------------------- bfloat16
def dot_operands(jaxpr, found=None) -> list:
    """The operand dtypes of every ``dot_general`` in ``jaxpr`` and the jaxprs inside it."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            dot_operands(sub, found)
    return found


@pytest.mark.slow  # two train steps compiled: seconds
def test_bfloat16_compute_of_a_gpt(gpt):
    model, params = gpt
    opt = make_optimizer("adamw", 1e-3, weight_decay=0.1)
    state = create_train_state(model, opt, jax.random.key(0), (1, T)).replace(params=params)
    step32 = make_train_step(model, opt)
    step16 = make_train_step(model, opt, compute_dtype="bfloat16")
    data = batch(5, n=16)
    # the forward pass: every matmul in bfloat16; the backward: none in float32 alone (the attention
    # logits' cotangent is float32, as jax.nn.dot_product_attention computes the logits in float32)
    from fundl.train.step import forward

    fwd = jax.make_jaxpr(lambda p, x: forward(model, p, {}, x, None, True, jnp.bfloat16)[0])(params, data["x"])
    assert set(dot_operands(fwd.jaxpr)) == {("bfloat16", "bfloat16")}
    dots = dot_operands(jax.make_jaxpr(step16)(state, data).jaxpr)
    assert len(dots) > 10 and all("bfloat16" in d for d in dots), dots
    s32, m32 = jax.jit(step32)(state, data)
    s16, m16 = jax.jit(step16)(state, data)
    assert {x.dtype for x in jax.tree.leaves(s16.params)} == {jnp.dtype(jnp.float32)}  # master params
    assert m16["loss"].dtype == jnp.float32
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
    moved16 = jax.tree.map(lambda a, b: a - b, s16.params, params)
    moved32 = jax.tree.map(lambda a, b: a - b, s32.params, params)
    cos = optax.tree.vdot(moved16, moved32) / (optax.tree.norm(moved16) * optax.tree.norm(moved32))
    assert cos > 0.9, cos  # the same update, up to bfloat16's rounding


# ----------------------------------------------------------- sharding and FSDP
# The partition rules of docs/parallel.md for a data x model mesh: each block's attention and MLP
# split Megatron-style over 'model' (the first matrix by columns, the second by rows); unanchored,
# so the optimiser's moments follow their parameters.
GPT_RULES = [["attention/qkv/w$", ["", "model"]], ["attention/out/w$", ["model", ""]],
             ["mlp/fc/w$", ["", "model"]], ["mlp/proj/w$", ["model", ""]]]

WORKER = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np, optax
from fundl import models
from fundl.train.placement import make_placement
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step

vocab, T, sizes, rules = json.loads(sys.argv[1])
model = models.gpt(vocab, **sizes)
opt = optax.sgd(0.5, momentum=0.9)
step = make_train_step(model, opt)
ids = np.asarray(jax.random.randint(jax.random.key(1), (3, 8, T + 1), 0, vocab))
out = {}
for name, kw in {"one": dict(mode="none"), "sharding": dict(mode="sharding", devices=4),
                 "fsdp": dict(mode="fsdp", devices=4, min_size=64),
                 "fsdp_tp": dict(mode="fsdp", devices=4, model_devices=2, rules=rules, min_size=64)}.items():
    placement = make_placement(**kw)
    state = placement.put_state(create_train_state(model, opt, jax.random.key(0), (1, T)))
    run = placement.compile_train(step)
    losses = []
    for b in ids:
        state, m = run(state, placement.put_batch({"x": b[:, :-1], "y": b[:, 1:]}))
        losses.append(float(placement.host_metrics(m)["loss"]))
    specs = {p.split(": ")[0]: p.split(" -> ")[1] for p in placement.describe(state)}
    params = jax.tree.leaves(placement.get_state(state).params)
    out[name] = {"losses": losses, "params": [np.asarray(p).tolist() for p in params], "specs": specs}
print(json.dumps(out))
"""


@pytest.mark.slow  # a subprocess with 4 fake CPU devices compiling four placements: seconds
def test_a_gpt_sharded_and_fsdp_with_data_by_model_rules_equals_one_device():
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps([VOCAB, T, SIZES, GPT_RULES])],
                          env=clean_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one = out["one"]
    for name in ("sharding", "fsdp", "fsdp_tp"):
        np.testing.assert_allclose(out[name]["losses"], one["losses"], rtol=1e-5, err_msg=name)
        for a, b in zip(out[name]["params"], one["params"]):
            a, b = np.asarray(a), np.asarray(b)
            assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-12), name
    assert out["sharding"]["specs"] == {}  # data parallel: every leaf whole
    assert out["fsdp"]["specs"]["params/block_0/mlp/fc/w"] == "(None, 'data')"  # the automatic rule
    tp = out["fsdp_tp"]["specs"]
    for i in range(SIZES["layers"]):
        assert tp[f"params/block_{i}/attention/qkv/w"] == "(None, 'model')"
        assert tp[f"params/block_{i}/attention/out/w"] == "('model', None)"
        assert tp[f"params/block_{i}/mlp/fc/w"] == "(None, 'model')"
        assert tp[f"params/block_{i}/mlp/proj/w"] == "('model', None)"
        (moment,) = [k for k in tp if k.startswith("opt_state/") and k.endswith(f"trace/block_{i}/mlp/fc/w")]
        assert tp[moment] == "(None, 'model')"  # the momentum follows its parameter
    assert tp["params/embedding/w"] == "(None, 'data')"  # no rule: split over 'data' automatically
