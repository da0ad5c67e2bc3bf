"""What ``fit`` and ``fundl.run.experiment`` do so that the loop costs little beside the step (issue 13).

The evaluation is compiled before training (a broken one fails before the first step; no
evaluation stops training to compile), and the per-dispatch host work stays small.
"""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fundl.run import config as cfg
from fundl.run import experiment
from fundl.data import Dataset
from fundl.nn.core import ShapeError
from fundl.train import loop
from fundl.run.rundir import read_metrics

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


def eval_compiles(config: dict, run_dir: Path) -> list[int]:
    """Run ``config`` through ``fundl.run.experiment.run`` and count the XLA compiles inside each
    evaluation ``fit`` runs."""
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

    experiment.fit = fit_counting_eval_compiles
    try:
        with CompileCounter() as counter:
            summary = experiment.run(config, run_dir, verbose=False)
    finally:
        experiment.fit = real_fit
    assert summary["test_accuracy"] is not None
    return compiles_per_eval


@pytest.mark.parametrize("overrides", [[], ["training.ensemble=2"]], ids=["one", "ensemble"])
def test_no_evaluation_inside_fit_compiles(tmp_path, overrides):
    """Every evaluation fit runs finds the eval step compiled: none stops training to compile
    (the first one did, 0.1-0.2 s in the middle of the MNIST-1D runs)."""
    assert eval_compiles(tiny(*overrides), tmp_path / "run") == [0, 0]  # at steps 12 and 24 of 24


@pytest.mark.parametrize("mode", ["pmap", "sharding", "fsdp"])
def test_no_evaluation_inside_fit_compiles_on_two_devices(tmp_path, mode):
    """The same under every multi-device placement (2 fake CPU devices, in a fresh process): the
    state compiled for ahead of training is placed as fit's is, so the compiled eval step is reused."""
    code = (f"import jax; jax.config.update('jax_num_cpu_devices', 2)\n"
            f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            f"import test_loop_overheads as t\n"
            f"from pathlib import Path\n"
            f"print(t.eval_compiles(t.tiny('parallel.mode=\"{mode}\"'), Path({str(tmp_path / 'run')!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0]"


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
