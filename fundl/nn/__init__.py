"""fundl.nn: layers as pairs of pure functions, and the combinators that compose them."""

from fundl.nn import init
from fundl.nn.activations import (
    elu, gelu, identity, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, softplus, swish, tanh,
)
from fundl.nn.core import (
    KeyMissingError, Layer, LayerError, ParamsError, ShapeError,
    abstract_init, elementwise, lambda_layer, named, parallel, residual, serial,
)
from fundl.nn.conv import (
    avg_pool1d, avg_pool2d, conv1d, conv2d, global_avg_pool, global_max_pool, max_pool1d, max_pool2d,
)
from fundl.nn.dropout import dropout
from fundl.nn.linear import dense, embedding, flatten, reshape
from fundl.nn.norm import batch_norm, group_norm, layer_norm
from fundl.nn.remat import remat, remat_cell, remat_serial
from fundl.nn.recurrent import (
    Cell, bidirectional, gru, gru_cell, gru_params_from_torch, lstm, lstm_cell, lstm_params_from_torch,
    reverse_sequences, rnn, stacked,
)
from fundl.nn.summary import summary
