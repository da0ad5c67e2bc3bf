"""Ready-made models, each an ordinary :class:`fundl.nn.Layer`.

They are short compositions of ``fundl.nn`` layers, meant to be read and
copied: MLP, 2D CNN for images, 1D CNN for sequences, an RNN classifier and
a character-level language model.  ``build_model`` makes one from a config's
``[model]`` section.
"""

from __future__ import annotations

from typing import Sequence

from fundl import nn
from fundl.nn.remat import remat_cell, remat_serial

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": nn.tanh, "silu": nn.silu,
               "elu": nn.elu, "sigmoid": nn.sigmoid}


def _activation(name: str) -> nn.Layer:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _dropout(rate: float) -> list[nn.Layer]:
    return [nn.dropout(rate)] if rate else []


def _hidden_blocks(hidden: Sequence[int], activation: str, dropout: float) -> list[list[nn.Layer]]:
    """One ``[dense, activation, [dropout]]`` block per hidden width."""
    return [[nn.dense(width), _activation(activation), *_dropout(dropout)] for width in hidden]


def _head(hidden: Sequence[int], num_outputs: int, activation: str, dropout: float) -> list[nn.Layer]:
    """Dense -> activation -> [dropout] per hidden width, then ``dense(num_outputs)``."""
    return [layer for block in _hidden_blocks(hidden, activation, dropout) for layer in block] + [
        nn.dense(num_outputs)]


def mlp(hidden: Sequence[int], num_outputs: int, *, activation: str = "relu", dropout: float = 0.0,
        input_dropout: float = 0.0, remat: bool = False) -> nn.Layer:
    """Flatten, then dense layers of the given widths, then ``dense(num_outputs)``.

    ``mlp([128], 10)`` is the classic 784 -> 128 relu -> 10 MNIST model.
    ``dropout`` (drop probability) acts after each hidden activation;
    ``input_dropout`` on the flattened inputs (0 by default: inputs are
    never dropped unless asked).

    ``remat=True`` recomputes each hidden block (dense -> activation ->
    [dropout]) in the backward pass (:func:`fundl.nn.remat.remat_serial`,
    ``mode="custom_vjp"``, the mode XLA:CPU does not undo): under ``grad`` only
    each block's input is kept.  Same params tree, keys and outputs as
    ``remat=False``; reverse-mode differentiation only (``grad``, ``vjp``).
    What it saves and costs is measured in docs/transforms.md, "Rematerialisation".
    """
    inputs = [nn.flatten(), *_dropout(input_dropout)]
    if remat:
        return remat_serial(*inputs, *_hidden_blocks(hidden, activation, dropout), nn.dense(num_outputs),
                            name="mlp", mode="custom_vjp")
    return nn.serial(*inputs, *_head(hidden, num_outputs, activation, dropout), name="mlp")


def _conv_stack(nd: int, channels, kernel_size, stride, padding, pool, batch_norm, activation, axis_name=None):
    conv = nn.conv1d if nd == 1 else nn.conv2d
    pools = {"avg": nn.avg_pool1d if nd == 1 else nn.avg_pool2d,
             "max": nn.max_pool1d if nd == 1 else nn.max_pool2d}
    layers = []
    for c in channels:
        layers.append(conv(c, kernel_size, stride=stride, padding=padding, use_bias=not batch_norm))
        if batch_norm:
            layers.append(nn.batch_norm(axis_name=axis_name))
        layers.append(_activation(activation))
        if pool != "none":
            layers.append(pools[pool](2))
    return layers


def cnn(channels: Sequence[int], hidden: Sequence[int], num_outputs: int, *, kernel_size=3, stride=1,
        padding="SAME", pool: str = "avg", batch_norm: bool = False, activation: str = "relu",
        dropout: float = 0.0, nd: int = 2, axis_name: str | None = None) -> nn.Layer:
    """Conv blocks (conv -> [batch norm] -> activation -> [2x pool]), flatten, dense head.

    ``nd=2`` for images (N, H, W, C), ``nd=1`` for sequences (N, T, C).
    ``cnn([32, 64], [256], 10)`` is the benchmark CNN: conv3x3 32 relu, avgpool 2,
    conv3x3 64 relu, avgpool 2, dense 256 relu, dense 10.
    ``axis_name``: under ``pmap`` with that axis name, batch-norm statistics
    are averaged over devices (global-batch statistics).
    ``dropout`` acts on the flattened conv features and after each hidden
    dense activation, never on the raw inputs.
    """
    return nn.serial(
        *_conv_stack(nd, channels, kernel_size, stride, padding, pool, batch_norm, activation, axis_name),
        nn.flatten(), *_dropout(dropout), *_head(hidden, num_outputs, activation, dropout),
        name="cnn" if nd == 2 else "cnn1d")


def cnn1d(channels: Sequence[int], hidden: Sequence[int], num_outputs: int, **kw) -> nn.Layer:
    """:func:`cnn` over sequences (N, T, C)."""
    return cnn(channels, hidden, num_outputs, nd=1, **kw)


def _recurrent(cell: str, hidden: int, *, num_layers: int, dropout: float, bidirectional: bool = False,
               return_sequences: bool = True, remat: bool = False) -> nn.Layer:
    """``nn.lstm``/``nn.gru(hidden, num_layers=..., ...)``; with ``remat`` the same layer built from
    a cell whose step is checkpointed (:func:`fundl.nn.remat.remat_cell`) with ``nn.rnn``,
    ``nn.bidirectional`` and ``nn.stacked`` as ``nn.lstm`` builds it: same params, keys, outputs."""
    make = nn.lstm if cell == "lstm" else nn.gru
    if not remat:
        return make(hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                    bidirectional=bidirectional, return_sequences=return_sequences)
    step_cell = remat_cell(nn.lstm_cell(hidden) if cell == "lstm" else nn.gru_cell(hidden))

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
    ``kw``: ``bidirectional``, ``return_sequences``, ``remat`` (see :func:`_recurrent`).
    """
    if cell not in ("lstm", "gru"):
        raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
    layer = _recurrent(cell, hidden, num_layers=num_layers, dropout=dropout, **kw)
    return [nn.named(cell, layer), *_dropout(dropout)]


def rnn_classifier(cell: str, hidden: int, num_outputs: int, *, num_layers: int = 1,
                   bidirectional: bool = False, readout: str = "last", dropout: float = 0.0,
                   remat: bool = False) -> nn.Layer:
    """LSTM/GRU over (B, T, F), then ``dense(num_outputs)``.

    ``readout="last"`` reads the output after the last step (for a
    bidirectional net: forward after the last step and backward after the
    first, concatenated); ``"mean"`` averages the outputs over time.
    ``dropout`` acts on every recurrent layer's outputs, including the last
    (before the readout), so it works with ``num_layers=1``.
    ``remat=True`` checkpoints the recurrent cell's step inside the time scan
    (:func:`fundl.nn.remat.remat_cell`): the backward pass keeps only the carry
    per step and recomputes the gates (measured in docs/transforms.md,
    "Rematerialisation"); same params, keys and outputs as ``remat=False``.
    """
    if readout not in ("last", "mean"):
        raise ValueError(f"readout must be 'last' or 'mean', got {readout!r}")
    seq = _sequence_layer(cell, hidden, num_layers=num_layers, bidirectional=bidirectional,
                          dropout=dropout, return_sequences=readout == "mean", remat=remat)
    pool = [nn.lambda_layer(lambda y: y.mean(axis=1), "mean_over_time")] if readout == "mean" else []
    return nn.serial(*seq, *pool, nn.dense(num_outputs), name="rnn_classifier")


def char_lm(vocab_size: int, *, embed_dim: int = 64, cell: str = "lstm", hidden: int = 128,
            num_layers: int = 1, dropout: float = 0.0, remat: bool = False) -> nn.Layer:
    """Character language model: ids (B, T) -> embedding -> LSTM/GRU -> logits (B, T, vocab).

    ``dropout`` acts on every recurrent layer's outputs and ``remat`` checkpoints
    the recurrent cell's step (see :func:`rnn_classifier`).
    """
    return nn.serial(nn.embedding(vocab_size, embed_dim),
                     *_sequence_layer(cell, hidden, num_layers=num_layers, dropout=dropout, remat=remat),
                     nn.dense(vocab_size), name="char_lm")
