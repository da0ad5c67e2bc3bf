"""fundl: functional deep learning in JAX.

A model is a :class:`fundl.nn.Layer`: ``init(key, input_shape)`` and
``apply(params, state, x, *, key=None, train=False)``, pure functions over
plain pytrees.  The top level re-exports the few names a training script
needs; everything else lives in its module (``fundl.nn``, ``fundl.models``,
``fundl.data``, ``fundl.train.*``, ``fundl.transforms``).  ``fundl.run`` is
the application layer that turns a config file into a run directory.

The names load on first use (PEP 562), so ``import fundl`` is cheap and a
command-line entry point can finish its start-up (``fundl.run.hugepages``)
before JAX is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it (a module name alone: the name is that module).
_EXPORTS = {
    "TrainState": "fundl.train.state", "create_train_state": "fundl.train.state",
    "evaluate": "fundl.train.loop", "fit": "fundl.train.loop",
    "make_optimizer": "fundl.train.optim", "make_schedule": "fundl.train.optim",
    "make_eval_step": "fundl.train.step", "make_train_step": "fundl.train.step",
    "generate": "fundl.generation",
    "losses": None, "metrics": None, "models": None, "nn": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fundl' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f"fundl.{name}") if module is None else \
        getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from fundl import losses, metrics, models, nn
    from fundl.generation import generate
    from fundl.train.loop import evaluate, fit
    from fundl.train.optim import make_optimizer, make_schedule
    from fundl.train.state import TrainState, create_train_state
    from fundl.train.step import make_eval_step, make_train_step
