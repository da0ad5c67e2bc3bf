"""fundl.run: the application layer, from a config file to a run directory.

It builds on the library (``fundl.nn``, ``fundl.train``, ...); the library
never imports it.  One module per job:

- ``schema``, ``config``: the config's keys; validation (``check_config``: the
  one place for rules between keys), TOML in and out.
- ``experiment``: ``run(config, run_dir)``, the run read top to bottom;
  ``build``: its pieces from a config (data, model, optimiser, state,
  placement, step); ``optimizer``: ``[optimizer]`` and ``[schedule]`` as Optax;
  ``privacy``: DP-SGD's set-up; ``evaluator``: test-split evaluation.
- ``sweeps``: the members of ensembles and sweeps; ``summary``: what they
  report (``summary.json`` rows, ``sweep.csv``/``.md``/``.png``).
- ``rundir``: run directories (claiming, metrics, plots); ``resume``: the
  resume policy; ``distributed``: multi-process start-up.
- ``errors``: errors to messages and exit codes; ``cli``: ``fundl-train``,
  ``fundl-evaluate``; ``launch_local``, ``reproduce_mnist1d``: the other tools;
  ``hugepages``: the re-exec every command does first.

Importing this package imports nothing else, so an entry point can re-execute
itself (``fundl.run.hugepages``) before JAX loads.
"""
