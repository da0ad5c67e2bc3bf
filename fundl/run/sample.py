"""``fundl-sample``: text from a trained language-model run (char_lm or gpt).

    fundl-sample RUN_DIR --prompt "ROMEO:" --tokens 500 [--temperature 0.8] [--top-k 40] [--seed 0]

Loads the run's config, rebuilds its model and data (the vocabulary is the
corpus's characters, as training built it), restores the newest valid
checkpoint, and prints the prompt and ``--tokens`` sampled characters
(``fundl.generate``: a KV cache for a GPT, the carry for the LSTM).
``--temperature 0`` is greedy.  An ensemble or sweep samples its first member.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fundl.run.errors import report_error
from fundl.run.rundir import RunDirError

LANGUAGE_MODELS = ("char_lm", "gpt")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fundl-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of a char_lm or gpt run")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=500, help="how many characters to sample (default 500)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely characters only")
    p.add_argument("--seed", type=int, default=0, help="the PRNG seed of the sampling (default 0)")
    return p


def sample_run(run_dir: str | Path, prompt: str, tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, seed: int = 0) -> str:
    """The prompt followed by ``tokens`` characters sampled from ``run_dir``'s newest valid checkpoint."""
    import jax
    import jax.numpy as jnp

    from fundl.data import DataError
    from fundl.generation import generate
    from fundl.run import sweeps
    from fundl.run.build import load_data
    from fundl.run.config import ConfigError, load_config
    from fundl.run.evaluator import restore_newest

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.toml")
    if config["model"]["kind"] not in LANGUAGE_MODELS:
        raise ConfigError(f"{run_dir} trained model.kind = {config['model']['kind']!r}; sampling needs one of "
                          f"{list(LANGUAGE_MODELS)}")
    data = load_data(config)
    vocab = data.meta.get("vocab")
    if vocab is None:
        raise DataError(f"dataset {data.name!r} of {run_dir} has no vocabulary to decode samples with")
    try:
        ids = vocab.encode(prompt)
    except ValueError as e:
        raise DataError(f"--prompt: {e}") from None
    if ids.size == 0:
        raise DataError("--prompt: expected at least one character, got an empty prompt")
    model, state, _, _ = restore_newest(run_dir, config, data)
    params = state.params
    if len(sweeps.members(config)) > 1:
        params = jax.tree.map(lambda a: a[0], params)
    out = generate(model, params, jnp.asarray(ids)[None], tokens, key=jax.random.key(seed),
                   temperature=temperature, top_k=top_k)
    return vocab.decode(out[0])


def main(argv=None) -> int:
    """Print a sample of a run; the exit code (2: a bad command line or run directory; 1: an error)."""
    args = parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").is_file():
        return report_error(RunDirError(f"{run_dir} has no config.toml; is it a fundl run directory?"),
                            at_start_up=True)
    if args.tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        parser().error("--tokens and --temperature must be >= 0 and --top-k >= 1")
    try:
        text = sample_run(run_dir, args.prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                          seed=args.seed)
    except Exception as e:  # noqa: BLE001 - known errors become one message and an exit code
        code = report_error(e)
        if code is None:
            raise
        return code
    print(text)
    return 0


def console() -> None:
    """The ``fundl-sample`` console script: huge pages first (before JAX), then :func:`main`."""
    from fundl.run.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
