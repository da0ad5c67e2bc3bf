"""fundl.interop: weights from other frameworks as fundl params (PyTorch's LSTM and GRU, nanoGPT's GPT).

Each importer returns a plain params tree for a fundl layer from arrays the
caller has loaded (a missing tensor is an error that names it); nothing here
reads files or runs code from them.
"""

from fundl.interop.nanogpt import NanoGPTStateError, from_nanogpt
from fundl.interop.torch import gru_params_from_torch, lstm_params_from_torch

__all__ = ["lstm_params_from_torch", "gru_params_from_torch", "from_nanogpt", "NanoGPTStateError"]
