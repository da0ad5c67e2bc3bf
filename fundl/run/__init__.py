"""fundl.run: the application layer, from a config file to a run directory.

The config schema and its validation, the experiment runner, sweeps, run
directories and the resume policy, multi-process start-up, the command-line
entry points (``fundl-train``, ``fundl-evaluate``) and the one place where
errors become messages and exit codes.  It builds on the library (``fundl.nn``,
``fundl.train``, ...); the library never imports it.

Importing this package imports nothing else, so an entry point can re-execute
itself (``fundl.run.hugepages``) before JAX loads.
"""
