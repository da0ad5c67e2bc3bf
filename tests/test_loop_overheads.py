"""What ``fit`` and ``fundl.experiment`` do so that the loop costs little beside the step (issue 13).

The evaluation is compiled before training (a broken one fails before the first step; no
evaluation stops training to compile), and the per-dispatch host work stays small.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from fundl import config as cfg
from fundl import experiment
from fundl.data import Dataset
from fundl.nn.core import ShapeError
from fundl.train import loop
from fundl.train.rundir import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_synthetic.toml"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def tiny(*overrides):
    return cfg.load_config(TINY, ["logging.plots=false", *overrides])


class CompileCounter:
    """Counts XLA backend compilations while active (JAX's own monitoring event)."""

    def __init__(self):
        self.count = 0
        self.active = False

    def __call__(self, event, duration, **kwargs):
        if self.active and event == COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax._src.monitoring.unregister_event_duration_listener(self)


def test_no_evaluation_inside_fit_compiles(tmp_path, monkeypatch):
    """Every evaluation fit runs finds the eval step compiled: none stops training to compile
    (the first one did, 0.1-0.2 s in the middle of the MNIST-1D runs)."""
    compiles_per_eval = []
    real_fit = loop.fit

    def fit_counting_eval_compiles(*args, eval_fn, **kwargs):
        def counted(state):
            counter.active, before = True, counter.count
            try:
                return eval_fn(state)
            finally:
                counter.active = False
                compiles_per_eval.append(counter.count - before)

        return real_fit(*args, eval_fn=counted, **kwargs)

    monkeypatch.setattr(experiment, "fit", fit_counting_eval_compiles)
    with CompileCounter() as counter:
        summary = experiment.run(tiny(), tmp_path / "run", verbose=False)
    assert summary["test_accuracy"] is not None
    assert compiles_per_eval == [0, 0]  # at steps 12 and 24 of 24


def test_the_counter_sees_a_compile():
    """The check above can fail: a fresh jitted function counts one compile."""
    with CompileCounter() as counter:
        counter.active = True
        jax.jit(lambda x: x * 3.0 + 1.0)(np.ones(7, np.float32))
    assert counter.count == 1


def test_a_test_split_the_model_cannot_take_fails_before_training(tmp_path, monkeypatch):
    """An evaluation that cannot run fails before the first train step, not after eval_every steps."""
    real_load = experiment.load_data

    def load_with_bad_test(config):
        ds = real_load(config)
        bad = {**ds.test, "x": np.concatenate([ds.test["x"], ds.test["x"]], axis=1)}  # twice the features
        return Dataset(ds.name, ds.train, bad, ds.num_classes, ds.input_shape, ds.meta)

    monkeypatch.setattr(experiment, "load_data", load_with_bad_test)
    with pytest.raises(ShapeError, match=r"dense_0.*expected input of shape \(\.\.\., 16\), got shape \(64, 32\)"):
        experiment.run(tiny("training.eval_every=20", "training.steps=24"), tmp_path / "run", verbose=False)
    records = read_metrics(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else []
    assert [r for r in records if r["split"] == "train"] == []
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
