"""Every config key, given a value of the wrong type and a value out of range, through the command
line (``--set``), through ``--sweep`` and as a config dict to the Python API: exit 2 (or a
ConfigError), one line naming the key, no traceback (issue 24, items 1, 3 and 7).

The cases are generated from the schema (``fundl.run.schema``), so a key added there is covered
without a change here.  The command-line cases run in one process (tests/cli_batch_driver.py):
validation stops them before JAX loads.
"""

import json
import os
import subprocess
import sys

import pytest

from fundl.run import config as cfg
from fundl.run import schema
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_bad_input_cli")

TINY = str(ROOT / "configs" / "tiny_synthetic.toml")


def wrong_type(section: str, key: str):
    """A value of a type the key does not take: a string for a number, a float for anything else."""
    default = schema.SCHEMA[section][key]
    numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
    return "abc" if numeric else 1.5


def out_of_range(section: str, key: str):
    """A value of the key's type outside what the schema allows; None where there is no range
    (a bool, a free string)."""
    default = schema.SCHEMA[section][key]
    if (section, key) in schema.CHOICES and (section, key) not in schema.CHOICE_OR_INT:
        return "no_such_choice"
    if (section, key) in schema.CHOICE_OR_INT or (section, key) in schema.AUTO_OR_INT:
        return -1
    if (section, key) in schema.INT_OR_INT_LIST:
        return 0
    if isinstance(default, bool) or isinstance(default, str):
        return None
    if isinstance(default, (int, float)):
        lower, upper = schema.bounds(section, key)
        value = upper if upper is not None else 0 if lower == "> 0" else -1 if lower == ">= 0" else None
        return None if value is None else type(default)(value)
    if isinstance(default, list):
        kind, lower = schema.list_items(section, key)
        if kind in (int, float) and lower:
            return [kind(0 if lower == "> 0" else -1)]
        if kind is str:
            return ["not a setting"]
        if kind is list:
            return [["only one part"]]
        return [{"a": 1}]
    return None


def cases():
    """(section, key, what, value) for every key: its wrong-type value and its out-of-range one."""
    out = []
    for section, entries in schema.SCHEMA.items():
        for key in entries:
            out.append((section, key, "wrong type", wrong_type(section, key)))
            bad = out_of_range(section, key)
            if bad is not None:
                out.append((section, key, "out of range", bad))
    return out


CASES = cases()
RUN_DIR = "runs/never-created-by-test-bad-input-cli"  # no case may get as far as claiming it


def _set_args(section, key, value):
    return ["--config", TINY, "--run-dir", RUN_DIR, "--set", f"{section}.{key}={cfg.toml_value(value)}"]


def _sweep_args(section, key, value):
    good = cfg.toml_value(schema.SCHEMA[section][key])
    return ["--config", TINY, "--run-dir", RUN_DIR, "--sweep", f"{section}.{key}={good},{cfg.toml_value(value)}"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case through --set, then through --sweep: one driver process."""
    argvs = [_set_args(s, k, v) for s, k, _, v in CASES] + [_sweep_args(s, k, v) for s, k, _, v in CASES]
    path = tmp_path_factory.mktemp("cases") / "cases.json"
    path.write_text(json.dumps(argvs))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for name in ("FUNDL_DEBUG", "FUNDL_TRACEBACK"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch_driver.py"), str(path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert not (ROOT / RUN_DIR).exists()
    n = len(CASES)
    return out[:n], out[n:]


def _assert_one_line_naming(result, name, value_text=None):
    err = result["stderr"]
    lines = err.strip().splitlines()
    assert result["code"] == 2, (name, result)
    assert "Traceback" not in err, (name, err)
    assert 1 <= len(lines) <= 2 and lines[0].startswith("fundl: error: "), (name, err)
    assert len(lines) == 1 or lines[1].startswith("fundl: hint: "), (name, err)
    assert name in lines[0], (name, err)
    if value_text is not None:
        assert value_text in lines[0], (name, value_text, err)


def test_the_cases_cover_every_key_with_a_wrong_type():
    keys = {(s, k) for s, entries in schema.SCHEMA.items() for k in entries}
    assert {(s, k) for s, k, what, _ in CASES if what == "wrong type"} == keys
    # every number, choice and list key has an out-of-range case too (bools and free strings have no range)
    ranged = {(s, k) for s, k in keys if not isinstance(schema.SCHEMA[s][k], (bool, str))
              or (s, k) in schema.CHOICES or (s, k) in schema.AUTO_OR_INT}
    assert ranged - schema.SIGNED <= {(s, k) for s, k, what, _ in CASES if what == "out of range"}


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{s}.{k}-{w.replace(' ', '_')}" for s, k, w, _ in CASES])
def test_every_key_through_set_exits_2_with_one_line_naming_it(results, i):
    section, key, _, _ = CASES[i]
    _assert_one_line_naming(results[0][i], f"{section}.{key}")


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{s}.{k}-{w.replace(' ', '_')}" for s, k, w, _ in CASES])
def test_every_key_through_sweep_exits_2_naming_it_and_the_value(results, i):
    section, key, _, value = CASES[i]
    if (section, key) in (("training", "sweep"), ("training", "resume")):
        _assert_one_line_naming(results[1][i], f"{section}.{key} cannot be swept")
        return
    _assert_one_line_naming(results[1][i], f"{section}.{key}", cfg.toml_text(value))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{s}.{k}-{w.replace(' ', '_')}" for s, k, w, _ in CASES])
def test_every_key_as_a_config_dict_to_the_python_api_is_refused(i, tmp_path):
    """``fundl.run.experiment.run`` validates the dict it is given, before it touches the run directory."""
    from fundl.run import experiment

    section, key, _, value = CASES[i]
    config = cfg.load_config(TINY)
    config[section][key] = value
    with pytest.raises(cfg.ConfigError, match=f"{section}\\.{key}"):
        experiment.run(config, tmp_path / "run", verbose=False)
    assert not (tmp_path / "run").exists()
