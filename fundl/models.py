"""Ready-made models, each an ordinary :class:`fundl.nn.Layer`.

They are short compositions of ``fundl.nn`` layers, meant to be read and
copied: MLP, 2D CNN for images, 1D CNN for sequences, an RNN classifier,
a character-level language model and a GPT.  ``build_model`` makes one from a config's
``[model]`` section.

Initialisation (``init``, every model): ``"default"`` is fundl's — dense and
conv weights LeCun normal with zero biases, GRUs as torch's ``nn.GRU``, LSTMs
as torch's ``nn.LSTM`` plus 1 on the forget-gate bias; ``"torch"`` is
PyTorch's defaults throughout — dense and conv weights and biases
U(±1/sqrt(fan_in)) (:func:`fundl.nn.init.torch_default`), LSTM forget bias
0 (GRU, embedding and batch norm are the same either way).  The MNIST-1D
paper's models (configs/mnist1d_paper_*.toml) are PyTorch models run with
these defaults, so reproducing them needs ``init="torch"``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from fundl import nn
from fundl.nn.decoding import Decoder
from fundl.nn.remat import remat_cell, remat_serial

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": nn.tanh, "silu": nn.silu,
               "elu": nn.elu, "sigmoid": nn.sigmoid}


INITS = ("default", "torch")


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")


def _dense(width: int, init: str) -> nn.Layer:
    """``nn.dense(width)``, with PyTorch's default init when ``init == "torch"``."""
    return nn.init.torch_default(nn.dense(width)) if init == "torch" else nn.dense(width)


def _activation(name: str) -> nn.Layer:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _dropout(rate: float) -> list[nn.Layer]:
    return [nn.dropout(rate)] if rate else []


def _hidden_blocks(hidden: Sequence[int], activation: str, dropout: float,
                   init: str = "default") -> list[list[nn.Layer]]:
    """One ``[dense, activation, [dropout]]`` block per hidden width."""
    return [[_dense(width, init), _activation(activation), *_dropout(dropout)] for width in hidden]


def _residual_blocks(count: int, width: int, activation: str, dropout: float, init: str) -> list[list[nn.Layer]]:
    """``count`` blocks ``h + [dropout](activation(dense(h)))`` of ``width`` units (``nn.residual``)."""
    return [[nn.residual(_dense(width, init), _activation(activation), *_dropout(dropout))] for _ in range(count)]


def _head(hidden: Sequence[int], num_outputs: int, activation: str, dropout: float,
          init: str = "default") -> list[nn.Layer]:
    """Dense -> activation -> [dropout] per hidden width, then ``dense(num_outputs)``."""
    return [layer for block in _hidden_blocks(hidden, activation, dropout, init) for layer in block] + [
        _dense(num_outputs, init)]


def mlp(hidden: Sequence[int], num_outputs: int, *, activation: str = "relu", dropout: float = 0.0,
        input_dropout: float = 0.0, remat: bool = False, residual: int = 0, init: str = "default") -> nn.Layer:
    """Flatten, then dense layers of the given widths, then ``dense(num_outputs)``.

    ``mlp([128], 10)`` is the classic 784 -> 128 relu -> 10 MNIST model;
    ``mlp([], 10)`` is logistic regression.
    ``dropout`` (drop probability) acts after each hidden activation;
    ``input_dropout`` on the flattened inputs (0 by default: inputs are
    never dropped unless asked).

    ``residual=k`` adds ``k`` blocks ``h + activation(dense(h))`` of the last
    hidden width after the hidden layers (params ``residual_0``, ...; dropout,
    if any, on the branch): ``mlp([100], 10, residual=1)`` is the MNIST-1D
    paper's MLP.  ``init``: ``"default"`` or ``"torch"`` (module docstring).

    ``remat=True`` recomputes each hidden block (dense -> activation ->
    [dropout]) in the backward pass (:func:`fundl.nn.remat.remat_serial`,
    ``mode="custom_vjp"``, the mode XLA:CPU does not undo): under ``grad`` only
    each block's input is kept.  Same params tree, keys and outputs as
    ``remat=False``; reverse-mode differentiation only (``grad``, ``vjp``).
    What it saves and costs is measured in docs/transforms.md, "Rematerialisation".

    Examples:
        >>> model = models.mlp([128], 10)                 # any input shape: it is flattened
        >>> params, state, out_shape = nn.abstract_init(model, (1, 28, 28, 1))
        >>> sorted(params), sum(p.size for p in jax.tree.leaves(params)), out_shape
        (['dense_0', 'dense_1'], 101770, (1, 10))
    """
    _check_init(init)
    if residual and not hidden:
        raise ValueError(f"mlp: residual={residual} blocks need a hidden layer to add to, got hidden={list(hidden)}")
    inputs = [nn.flatten(), *_dropout(input_dropout)]
    blocks = _hidden_blocks(hidden, activation, dropout, init)
    blocks += _residual_blocks(residual, hidden[-1], activation, dropout, init) if residual else []
    if remat:
        return remat_serial(*inputs, *blocks, _dense(num_outputs, init), name="mlp", mode="custom_vjp")
    return nn.serial(*inputs, *[layer for block in blocks for layer in block], _dense(num_outputs, init), name="mlp")


def _kernel_sizes(kernel_size, channels) -> list:
    """One kernel size per conv layer: a *list* gives one per layer; anything else (an int, or
    a tuple such as conv2d's (h, w)) is every layer's."""
    if not isinstance(kernel_size, list):
        return [kernel_size] * len(channels)
    sizes = kernel_size
    if len(sizes) != len(channels):
        raise ValueError(f"cnn: kernel_size must be an int or one size per conv layer ({len(channels)} for "
                         f"channels={list(channels)}), got {len(sizes)} sizes {sizes}")
    return sizes


def _conv_stack(nd: int, channels, kernel_size, stride, padding, pool, batch_norm, activation, axis_name=None,
                init="default"):
    conv = nn.conv1d if nd == 1 else nn.conv2d
    wrap = nn.init.torch_default if init == "torch" else (lambda layer: layer)
    pools = {"avg": nn.avg_pool1d if nd == 1 else nn.avg_pool2d,
             "max": nn.max_pool1d if nd == 1 else nn.max_pool2d}
    layers = []
    for c, k in zip(channels, _kernel_sizes(kernel_size, channels)):
        layers.append(wrap(conv(c, k, stride=stride, padding=padding, use_bias=not batch_norm)))
        if batch_norm:
            layers.append(nn.batch_norm(axis_name=axis_name))
        layers.append(_activation(activation))
        if pool != "none":
            layers.append(pools[pool](2))
    return layers


def cnn(channels: Sequence[int], hidden: Sequence[int], num_outputs: int, *, kernel_size=3, stride=1,
        padding="SAME", pool: str = "avg", batch_norm: bool = False, activation: str = "relu",
        dropout: float = 0.0, nd: int = 2, axis_name: str | None = None, init: str = "default") -> nn.Layer:
    """Conv blocks (conv -> [batch norm] -> activation -> [2x pool]), flatten, dense head.

    ``nd=2`` for images (N, H, W, C), ``nd=1`` for sequences (N, T, C).
    ``cnn([32, 64], [256], 10)`` is the benchmark CNN: conv3x3 32 relu, avgpool 2,
    conv3x3 64 relu, avgpool 2, dense 256 relu, dense 10.
    ``kernel_size``: an int (or a 2D ``(h, w)`` tuple) for every conv layer, or
    a list with one per layer;
    ``padding``: ``"SAME"``, ``"VALID"`` or an int (zeros on both sides, as
    torch's ``padding=p``).  ``cnn1d([25, 25, 25], [], 10, kernel_size=[5, 3, 3],
    stride=2, padding=1, pool="none", init="torch")`` is the MNIST-1D paper's
    CNN (its flatten order is (time, channel) where torch's is (channel, time):
    the same model up to a permutation of the readout's rows).
    ``init``: ``"default"`` or ``"torch"`` (module docstring).
    ``axis_name``: under ``pmap`` with that axis name, batch-norm statistics
    are averaged over devices (global-batch statistics).
    ``dropout`` acts on the flattened conv features and after each hidden
    dense activation, never on the raw inputs.

    Examples:
        >>> model = models.cnn([32, 64], [256], 10)       # images (N, 28, 28, 1) -> logits (N, 10)
        >>> params, state, out_shape = nn.abstract_init(model, (1, 28, 28, 1))
        >>> sorted(params), sum(p.size for p in jax.tree.leaves(params)), out_shape
        (['conv2d_0', 'conv2d_1', 'dense_0', 'dense_1'], 824458, (1, 10))
    """
    _check_init(init)
    return nn.serial(
        *_conv_stack(nd, channels, kernel_size, stride, padding, pool, batch_norm, activation, axis_name, init),
        nn.flatten(), *_dropout(dropout), *_head(hidden, num_outputs, activation, dropout, init),
        name="cnn" if nd == 2 else "cnn1d")


def cnn1d(channels: Sequence[int], hidden: Sequence[int], num_outputs: int, **kw) -> nn.Layer:
    """:func:`cnn` over sequences (N, T, C): ``cnn(..., nd=1)``, the same options.

    Examples:
        >>> model = models.cnn1d([32, 32], [64], 10, batch_norm=True)   # MNIST-1D: (N, 40, 1)
        >>> params, state, out_shape = nn.abstract_init(model, (1, 40, 1))
        >>> sorted(state), out_shape                     # batch norm's running statistics
        (['batch_norm_0', 'batch_norm_1'], (1, 10))
    """
    return cnn(channels, hidden, num_outputs, nd=1, **kw)


def _recurrent(cell: str, hidden: int, *, num_layers: int, dropout: float, bidirectional: bool = False,
               return_sequences: bool = True, remat: bool = False, init: str = "default") -> nn.Layer:
    """``nn.lstm``/``nn.gru(hidden, num_layers=..., ...)``; with ``remat`` the same layer built from
    a cell whose step is checkpointed (:func:`fundl.nn.remat.remat_cell`) with ``nn.rnn``,
    ``nn.bidirectional`` and ``nn.stacked`` as ``nn.lstm`` builds it: same params, keys, outputs.
    ``init="torch"``: the LSTM's forget-gate bias gets no +1 (torch's init); the GRU is torch's either way."""
    lstm_opts = {"forget_bias": 0.0 if init == "torch" else 1.0} if cell == "lstm" else {}
    make = nn.lstm if cell == "lstm" else nn.gru
    if not remat:
        return make(hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                    bidirectional=bidirectional, return_sequences=return_sequences, **lstm_opts)
    step_cell = remat_cell(nn.lstm_cell(hidden, **lstm_opts) if cell == "lstm" else nn.gru_cell(hidden))

    def one(sequences):
        layer = nn.rnn(step_cell, return_sequences=sequences, name=cell)
        return nn.bidirectional(layer, name="bi" + cell) if bidirectional else layer

    if num_layers == 1:
        return one(return_sequences)
    # every layer but the last returns its sequence; the last returns what was asked
    return nn.stacked(*[one(k < num_layers - 1 or return_sequences) for k in range(num_layers)],
                      dropout=dropout, name=cell)


def _sequence_layer(cell: str, hidden: int, *, num_layers: int, dropout: float, **kw) -> list[nn.Layer]:
    """The recurrent layers, then dropout on the last layer's outputs.

    ``dropout`` acts after every recurrent layer: between stacked layers (as
    torch's ``nn.LSTM(dropout=...)``) and on the last layer's outputs, so it
    also works for one layer (where torch's would do nothing and warn).
    ``kw``: ``bidirectional``, ``return_sequences``, ``remat``, ``init`` (see :func:`_recurrent`).
    """
    if cell not in ("lstm", "gru"):
        raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
    layer = _recurrent(cell, hidden, num_layers=num_layers, dropout=dropout, **kw)
    return [nn.named(cell, layer), *_dropout(dropout)]


READOUTS = ("last", "mean", "flatten")


def _readout(readout: str) -> list[nn.Layer]:
    """The layers between the recurrent outputs (B, T, H) and the dense readout."""
    if readout == "mean":
        return [nn.lambda_layer(lambda y: y.mean(axis=1), "mean_over_time")]
    return [nn.flatten()] if readout == "flatten" else []


def rnn_classifier(cell: str, hidden: int, num_outputs: int, *, num_layers: int = 1,
                   bidirectional: bool = False, readout: str = "last", dropout: float = 0.0,
                   remat: bool = False, init: str = "default") -> nn.Layer:
    """LSTM/GRU over (B, T, F), then ``dense(num_outputs)``.

    ``readout="last"`` reads the output after the last step (for a
    bidirectional net: forward after the last step and backward after the
    first, concatenated); ``"mean"`` averages the outputs over time;
    ``"flatten"`` feeds every step's output, flattened to (B, T * H), to the
    dense layer (the MNIST-1D paper's GRU: ``rnn_classifier("gru", 6, 10,
    bidirectional=True, readout="flatten", init="torch")``; its (t, feature)
    order is torch's ``output.reshape(B, -1)``).
    ``init``: ``"default"`` or ``"torch"`` (module docstring).
    ``dropout`` acts on every recurrent layer's outputs, including the last
    (before the readout), so it works with ``num_layers=1``.
    ``remat=True`` checkpoints the recurrent cell's step inside the time scan
    (:func:`fundl.nn.remat.remat_cell`): the backward pass keeps only the carry
    per step and recomputes the gates (measured in docs/transforms.md,
    "Rematerialisation"); same params, keys and outputs as ``remat=False``.

    Examples:
        >>> model = models.rnn_classifier("gru", 64, 10)  # (N, T, F) -> logits (N, 10)
        >>> params, state, out_shape = nn.abstract_init(model, (1, 40, 1))
        >>> sorted(params), out_shape
        (['dense_0', 'gru'], (1, 10))
    """
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
    _check_init(init)
    seq = _sequence_layer(cell, hidden, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                          return_sequences=readout != "last", remat=remat, init=init)
    return nn.serial(*seq, *_readout(readout), _dense(num_outputs, init), name="rnn_classifier")


def char_lm(vocab_size: int, *, embed_dim: int = 64, cell: str = "lstm", hidden: int = 128,
            num_layers: int = 1, dropout: float = 0.0, remat: bool = False, init: str = "default") -> nn.Layer:
    """Character language model: ids (B, T) -> embedding -> LSTM/GRU -> logits (B, T, vocab).

    ``dropout`` acts on every recurrent layer's outputs and ``remat`` checkpoints
    the recurrent cell's step (see :func:`rnn_classifier`); ``init``: module docstring.

    Examples:
        >>> model = models.char_lm(65)                    # ids (N, T) -> next-id logits (N, T, 65)
        >>> params, state, out_shape = nn.abstract_init(model, (1, 64))
        >>> sorted(params), out_shape
        (['dense_0', 'embedding_0', 'lstm'], (1, 64, 65))
    """
    _check_init(init)
    model = nn.serial(nn.embedding(vocab_size, embed_dim),
                      *_sequence_layer(cell, hidden, num_layers=num_layers, dropout=dropout, remat=remat, init=init),
                      _dense(vocab_size, init), name="char_lm")
    return model._replace(decoder=_char_lm_decoder(cell, hidden, num_layers))


def _char_lm_decoder(cell: str, hidden: int, num_layers: int) -> Decoder:
    """:func:`char_lm`'s decoder (:mod:`fundl.nn.decoding`): the cache is the recurrent carry of
    every layer, and a step scans the cells over the new ids from it (dropout is off in a step)."""
    step_cell = nn.lstm_cell(hidden) if cell == "lstm" else nn.gru_cell(hidden)

    def layer_params(params, k):
        p = params[cell]
        return p if num_layers == 1 else p[f"layer_{k}"]

    def init_cache(params, batch_size, max_len, dtype):
        return tuple(step_cell.initial_carry((batch_size,), dtype) for _ in range(num_layers))

    def step(params, cache, ids, position):
        x = jnp.take(params["embedding_0"]["w"], ids, axis=0)
        xs, carries = jnp.swapaxes(x, 0, 1), []                      # time-major for the scan
        for k, carry in enumerate(cache):
            p = layer_params(params, k)
            carry, xs = jax.lax.scan(lambda c, x_t, p=p: step_cell.step(p, c, x_t), carry, xs)
            carries.append(carry)
        head = params["dense_0"]
        return jnp.swapaxes(xs, 0, 1) @ head["w"] + head["b"], tuple(carries)

    return Decoder(init_cache, step)


def gpt(vocab_size: int, *, context: int, layers: int, heads: int, width: int, dropout: float = 0.0,
        bias: bool = True, num_kv_heads: int | None = None, mlp: str = "gelu", norm: str = "layer",
        rope: bool = False, remat: bool = False) -> nn.Layer:
    """A GPT: ids (B, T <= context) -> logits (B, T, vocab), nanoGPT's architecture and initialisation.

    Token embedding plus learned position embedding (``context`` rows), dropout,
    ``layers`` pre-norm blocks (:func:`fundl.nn.transformer_block`: causal
    attention with ``heads`` heads, a 4x exact-GELU MLP, LayerNorm), a final
    LayerNorm and the output head tied to the token embedding
    (:func:`fundl.nn.tied_embedding`).  ``bias=False`` drops the biases of
    every dense layer and LayerNorm.  Init as nanoGPT's: every weight normal
    with std 0.02, the two projections into the residual stream per block with
    std ``0.02 / sqrt(2 * layers)``, biases zero, norms one.  The model state is
    ``{}``.  Its decoder (:mod:`fundl.nn.decoding`) keeps a KV cache for
    :func:`fundl.generation.generate`.

    Beyond nanoGPT: ``num_kv_heads`` (grouped-query attention), ``mlp="swiglu"``,
    ``norm="rms"`` and ``rope=True`` (rotary embeddings in every attention layer,
    instead of the learned positions).  ``remat=True`` recomputes each block in
    the backward pass (:func:`fundl.nn.remat.remat`, per block: same params and values).

    Params: ``embedding`` (``w`` (vocab, width)), ``positions`` (``w`` (context,
    width); none with ``rope``), ``block_0`` .. ``block_{layers-1}``
    (``norm_1``, ``attention`` {``qkv``, ``out``}, ``norm_2``, ``mlp`` {``fc``, ``proj``}),
    ``norm``.  :func:`fundl.interop.nanogpt.from_nanogpt` maps nanoGPT's state_dict onto them.

    Examples:
        >>> model = models.gpt(65, context=64, layers=4, heads=4, width=128)   # nanoGPT's "baby" GPT
        >>> params, state, out_shape = nn.abstract_init(model, (1, 64))
        >>> sorted(params)[:3], state, out_shape
        (['block_0', 'block_1', 'block_2'], {}, (1, 64, 65))
        >>> sum(p.size for p in jax.tree.leaves(params))
        809856
    """
    for key, value in (("context", context), ("layers", layers), ("heads", heads), ("width", width)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"gpt: {key} must be a positive int, got {value!r}")
    if width % heads:
        raise ValueError(f"gpt: heads={heads} must divide width={width}")
    std = nn.init.normal(0.02)
    residual_std = nn.init.normal(0.02 / math.sqrt(2 * layers))
    blocks = [nn.named(f"block_{i}", nn.transformer_block(
        heads, num_kv_heads=num_kv_heads, mlp=mlp, norm=norm, use_bias=bias, dropout=dropout, rope=rope,
        w_init=std, out_init=residual_std)) for i in range(layers)]
    blocks = [nn.remat(b) for b in blocks] if remat else blocks  # name, params, decoder unchanged
    final_norm = nn.layer_norm(use_bias=bias) if norm == "layer" else nn.rms_norm(eps=1e-5)
    positions = [] if rope else [nn.named("positions", nn.learned_positions(context, w_init=std))]
    model = nn.tied_embedding(vocab_size, width, *positions, *_dropout(dropout), *blocks,
                              nn.named("norm", final_norm), w_init=std, name="gpt")
    return model._replace(decoder=model.decoder._replace(max_len=context))  # it reads <= context tokens, rope or not
