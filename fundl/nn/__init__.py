"""fundl.nn: layers as pairs of pure functions, and the combinators that compose them.

Every name below is importable from ``fundl.nn``; by module: ``core`` (the
``Layer`` contract, its errors, shape checks), ``combinators`` (``serial``,
``parallel``, ``residual``, ``named``), ``children`` (how a combinator treats
its children), ``linear``, ``conv`` (lowered by ``conv_lowering``), ``norm``,
``dropout``, ``activations``, ``init``, ``cells`` (LSTM and GRU steps),
``sequence`` (cells scanned over time: ``rnn``, ``lstm``, ``gru``,
``stacked``, ``bidirectional``), ``attention``, ``positional`` (learned and
rotary positions), ``transformer``, ``tied`` (embedding and head sharing one
table), ``decoding`` (the cache contract generation uses), ``remat`` and
``summary``.  PyTorch weights come in through ``fundl.interop``.
"""

from fundl.nn import init
from fundl.nn.activations import (
    elu, gelu, identity, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, softplus, swish, tanh,
)
from fundl.nn.attention import multi_head_attention
from fundl.nn.cells import Cell, gru_cell, lstm_cell
from fundl.nn.combinators import named, parallel, residual, serial
from fundl.nn.core import (
    KeyMissingError, Layer, LayerError, ParamsError, ShapeError, abstract_init, elementwise, lambda_layer,
)
from fundl.nn.conv import (
    avg_pool1d, avg_pool2d, conv1d, conv2d, global_avg_pool, global_max_pool, max_pool1d, max_pool2d,
)
from fundl.nn.dropout import dropout
from fundl.nn.linear import dense, embedding, flatten, reshape
from fundl.nn.norm import batch_norm, group_norm, layer_norm, rms_norm
from fundl.nn.positional import learned_positions, rotary
from fundl.nn.remat import remat, remat_cell, remat_serial
from fundl.nn.sequence import bidirectional, gru, lstm, reverse_sequences, rnn, stacked
from fundl.nn.summary import summary
from fundl.nn.tied import tied_embedding
from fundl.nn.transformer import transformer_block

# The public API, in the order docs/api/nn.md shows it (tests/test_site.py checks it lists every export).
__all__ = [  # noqa: RUF022 (ordered by topic, as the API page shows it)
    # the contract and errors (fundl.nn.core), combinators (fundl.nn.combinators)
    "Layer", "serial", "parallel", "residual", "named", "lambda_layer", "elementwise", "abstract_init", "summary",
    "LayerError", "ShapeError", "ParamsError", "KeyMissingError",
    # dense, embedding, shape
    "dense", "embedding", "flatten", "reshape",
    # convolution and pooling (channels-last)
    "conv1d", "conv2d", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "global_avg_pool",
    "global_max_pool",
    # normalisation and dropout
    "batch_norm", "layer_norm", "rms_norm", "group_norm", "dropout",
    # activations (each a Layer)
    "relu", "gelu", "tanh", "sigmoid", "silu", "swish", "elu", "leaky_relu", "softplus", "softmax", "log_softmax",
    "identity",
    # recurrent: cells (fundl.nn.cells), sequence layers (fundl.nn.sequence)
    "Cell", "lstm_cell", "gru_cell", "rnn", "lstm", "gru", "stacked", "bidirectional", "reverse_sequences",
    # attention and transformers
    "multi_head_attention", "learned_positions", "rotary", "transformer_block", "tied_embedding",
    # rematerialisation
    "remat", "remat_serial", "remat_cell",
    # initialisers (a module)
    "init",
]
