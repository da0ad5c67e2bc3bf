"""fundl: functional deep learning in JAX.

A model is a :class:`fundl.nn.Layer`: ``init(key, input_shape)`` and
``apply(params, state, x, *, key=None, train=False)``, pure functions over
plain pytrees.
"""

from fundl import nn

__version__ = "0.1.0"
