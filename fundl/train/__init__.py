"""fundl.train: the train state, pure steps, the loop, and what keeps a run safe.

- :mod:`fundl.train.state` -- :class:`~fundl.train.state.TrainState` (a pytree) and
  :func:`~fundl.train.state.create_train_state`.
- :mod:`fundl.train.step` -- ``make_train_step``/``make_eval_step`` (pure; jit them), fused steps.
- :mod:`fundl.train.loop` -- ``fit`` and ``evaluate``.
- :mod:`fundl.train.optim` -- Optax optimisers and schedules by name, from a config.
- :mod:`fundl.train.loss_scale` -- dynamic loss scaling for float16.
- :mod:`fundl.train.rundir`, :mod:`fundl.train.checkpoint`, :mod:`fundl.train.resume`,
  :mod:`fundl.train.signals` -- run directories, atomic verified checkpoints, safe resume, SIGTERM.
- :mod:`fundl.train.placement`, :mod:`fundl.train.ensemble` -- placements on devices, vmapped ensembles.

Importing this package imports none of them (``fundl.train.<module>`` does).
"""
