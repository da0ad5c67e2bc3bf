"""fundl.train: the train state, pure steps, the loop, and what keeps a run safe.

- :mod:`fundl.train.state` -- :class:`~fundl.train.state.TrainState` (a pytree) and
  :func:`~fundl.train.state.create_train_state`.
- :mod:`fundl.train.step` -- ``make_train_step``/``make_eval_step`` (pure; jit them).
- :mod:`fundl.train.fusion` -- fused steps: the one rule for optimiser steps per dispatch, ``make_multi_step``.
- :mod:`fundl.train.loop` -- ``fit`` and ``evaluate``.
- :mod:`fundl.train.compile_cache` -- the persistent compilation cache, on by default.
- :mod:`fundl.train.optim` -- Optax optimisers and schedules by name.
- :mod:`fundl.train.loss_scale` -- dynamic loss scaling for float16.
- :mod:`fundl.train.checkpoint`, :mod:`fundl.train.signals` -- atomic verified checkpoints, SIGTERM.
- :mod:`fundl.train.placement`, :mod:`fundl.train.ensemble` -- placements on devices, vmapped ensembles.

Importing this package imports none of them (``fundl.train.<module>`` does).
"""
