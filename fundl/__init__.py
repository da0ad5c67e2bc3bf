"""fundl: functional deep learning in JAX.

A model is a :class:`fundl.nn.Layer`: ``init(key, input_shape)`` and
``apply(params, state, x, *, key=None, train=False)``, pure functions over
plain pytrees.  The top level re-exports the few names a training script
needs; everything else lives in its module (``fundl.nn``, ``fundl.models``,
``fundl.data``, ``fundl.train.*``, ``fundl.config``).
"""

from fundl import losses, metrics, models, nn
from fundl.train.loop import evaluate, fit
from fundl.train.optim import make_optimizer, make_schedule
from fundl.train.state import TrainState, create_train_state
from fundl.train.step import make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "TrainState", "create_train_state", "evaluate", "fit", "losses", "make_eval_step", "make_optimizer",
    "make_schedule", "make_train_step", "metrics", "models", "nn",
]
