"""Reading a checkpoint: into a template state (any placement, any device count), or as NumPy arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from fundl.train.checkpoint import format1
from fundl.train.checkpoint.errors import CheckpointError
from fundl.train.checkpoint.manifest import STATE_DIR, read_manifest
from fundl.train.checkpoint.tree import key_impl, nest, target_sharding, template_leaves, unnest
from fundl.train.state import is_prng_key


def restore(path: str | Path, template) -> tuple[Any, dict]:
    """Fill ``template`` (a state of the right structure) from checkpoint ``path``.

    The template's leaves say where each restored leaf goes: a ``jax.Array``
    or a ``jax.ShapeDtypeStruct`` with a ``sharding`` is restored with that
    sharding (any device count: Orbax reads just the shards each process
    needs); a plain or NumPy array, or a ShapeDtypeStruct without sharding, is
    restored onto this process's first device.  Typed PRNG keys are rewrapped
    with the template's implementation.

    Returns ``(state, manifest)``.  Raises CheckpointError on a checksum
    failure or when paths, shapes or dtypes differ from the template.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    leaves, treedef, expected = template_leaves(template)
    got = {p: (tuple(v["shape"]), v["dtype"]) for p, v in manifest["leaves"].items()}
    if expected != got:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimiser state:\n{_describe_mismatches(expected, got)}")
    if manifest.get("format", 1) == 1:
        values = format1.read_leaves(path, leaves)
    else:
        targets = {p: jax.ShapeDtypeStruct(expected[p][0], np.dtype(expected[p][1]), sharding=target_sharding(leaf))
                   for p, leaf in leaves}
        values = _read_orbax(path, targets)
    out = [jax.random.wrap_key_data(value, impl=key_impl(leaf)) if is_prng_key(leaf) else value
           for (_, leaf), value in zip(leaves, values)]
    return jax.tree_util.tree_unflatten(treedef, out), manifest


def load_arrays(path: str | Path, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Every stored leaf of checkpoint ``path`` as NumPy, by tree path (typed keys as key data),
    without a template: for tools and tests.  Reads formats 1 and 2."""
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    if manifest.get("format", 1) == 1:
        return format1.read_all(path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {p: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]), sharding=device)
               for p, v in manifest["leaves"].items()}
    return {p: np.asarray(v) for p, v in zip(targets, _read_orbax(path, targets))}


def _read_orbax(path: Path, targets: dict) -> list:
    import orbax.checkpoint as ocp

    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as reader:
            tree = reader.restore((path / STATE_DIR).absolute(), args=ocp.args.StandardRestore(nest(targets)))
        return unnest(tree, targets)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_DIR}/ with Orbax ({e})") from None


def _describe_mismatches(expected: dict, got: dict, limit: int = 5) -> str:
    lines = []
    for p in list(expected) + [p for p in got if p not in expected]:  # the template's order: params first
        e, g = expected.get(p), got.get(p)
        if e == g:
            continue
        if e is None:
            lines.append(f"  {p}: in the checkpoint, not in the model's state {g}")
        elif g is None:
            lines.append(f"  {p}: expected {e}, missing from the checkpoint")
        else:
            lines.append(f"  {p}: expected {e}, checkpoint has {g}")
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more
