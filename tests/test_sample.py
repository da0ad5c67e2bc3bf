"""fundl-sample (fundl/run/sample.py, scripts/sample.py): text from a trained char_lm or gpt run's
newest valid checkpoint; greedy text equals the restored model's argmax, recomputed step by step."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from fundl.run.cli import train_main
from fundl.run.sample import main as sample_main
from fundl.run.sample import sample_run

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_sample")]  # slow: the module trains two tiny runs first

TINY = ["--set", "data.seq_len=16", "--set", "training.steps=3", "--set", "training.batch_size=8",
        "--set", "schedule.warmup_steps=1", "--set", "training.eval_every=0", "--set", "training.checkpoint_every=0",
        "--set", "training.eval_batch_size=2048", "--set", "logging.plots=false", "--quiet"]
MODELS = {"char_lm": ["--set", "model.embed_dim=4", "--set", "model.rnn_hidden=8"],
          "gpt": ["--set", "model.kind=gpt", "--set", "model.layers=1", "--set", "model.heads=2",
                  "--set", "model.width=16"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("fundl.data").load_dataset("shakespeare", seq_len=16)  # the corpus must be here
    out = {}
    for kind, options in MODELS.items():
        path = tmp_path_factory.mktemp("runs") / kind
        assert train_main(["--config", str(ROOT / "configs/shakespeare_char_lm.toml"), "--run-dir", str(path),
                           *TINY, *options]) == 0
        out[kind] = path
    return out


def test_greedy_sample_is_the_checkpoints_argmax_continuation(runs):
    from fundl.run.build import initial_state, load_data
    from fundl.run.config import load_config
    from fundl.train import checkpoint as ckpt

    run = runs["gpt"]
    text = sample_run(run, "ROMEO:", 20, temperature=0.0)     # 6 + 20 > the context of 16: the crop too
    assert text.startswith("ROMEO:") and len(text) == 26
    config = load_config(run / "config.toml")
    data = load_data(config)
    model, _, template = initial_state(config, data, 1)
    params = ckpt.restore(ckpt.latest_valid(run / "checkpoints"), template)[0].params
    apply = jax.jit(lambda ids: model.apply(params, {}, ids)[0])
    ids = list(data.meta["vocab"].encode("ROMEO:"))
    while len(ids) < 26:
        window = np.zeros((1, 16), np.int32)
        last = ids[-16:]
        window[0, :len(last)] = last
        ids.append(int(jnp.argmax(apply(jnp.asarray(window))[0, len(last) - 1])))
    assert text == data.meta["vocab"].decode(ids)


def test_char_lm_samples_print_the_prompt_and_the_tokens(runs, capsys):
    assert sample_main([str(runs["char_lm"]), "--prompt", "ROMEO:", "--tokens", "30", "--top-k", "5",
                        "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 30 + 1   # and print's newline
    assert sample_main([str(runs["char_lm"]), "--prompt", "ROMEO:", "--tokens", "30", "--top-k", "5",
                        "--seed", "1"]) == 0
    assert capsys.readouterr().out == first


def test_sample_errors_are_one_message_and_an_exit_code(runs, tmp_path, capsys):
    assert sample_main([str(runs["gpt"]), "--prompt", "ROMEO{", "--tokens", "3"]) == 2  # bad input
    err = capsys.readouterr().err
    assert err.startswith("fundl: error: ") and "'{' at position 5 is not in the 65-symbol vocabulary" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert sample_main([str(tmp_path)]) == 2
    assert "no config.toml" in capsys.readouterr().err


def test_the_script_prints_a_sample(runs):
    script = ROOT / "scripts" / "sample.py"
    done = subprocess.run([sys.executable, str(script), str(runs["gpt"]), "--prompt", "ROMEO:", "--tokens", "12",
                           "--temperature", "0"], capture_output=True, text=True, check=True)
    assert done.stdout == sample_run(runs["gpt"], "ROMEO:", 12, temperature=0.0) + "\n"
