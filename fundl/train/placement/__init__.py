"""How a training step is placed on devices.

A *placement* turns pure steps into compiled callables and moves states,
batches and metrics where they belong.  ``fit`` and ``evaluate`` only talk to
the typed contract :class:`~fundl.train.placement.contract.Placement`, so one
loop serves every placement.  There are two:

* :class:`~fundl.train.placement.mesh.MeshPlacement`: ``jax.jit`` with a
  ``Mesh`` and a ``NamedSharding`` per state leaf.  One device is a 1-device
  mesh; data parallelism, FSDP and an ensemble's member axis are partition
  rules of the same path (:mod:`fundl.train.placement.rules`).
* :class:`~fundl.train.placement.pmap.PmapPlacement`: ``jax.pmap``; the step
  averages over the named axis ``"batch"``.

All give the same parameters on the same global batches
(``tests/test_parallel.py``, ``tests/test_fsdp.py``, ``docs/parallel.md``).
"""

from __future__ import annotations

import jax

from fundl.train.placement.arrays import local_batches_divisible, state_bytes
from fundl.train.placement.contract import EvalView, Placement
from fundl.train.placement.mesh import MeshPlacement, mesh_devices
from fundl.train.placement.pmap import PmapPlacement

__all__ = ["EvalView", "MeshPlacement", "Placement", "PmapPlacement", "local_batches_divisible",
           "make_placement", "single_device", "state_bytes"]


def single_device() -> MeshPlacement:
    """The placement of a plain ``jax.jit`` on this process's first device (a 1-device mesh):
    what ``fit`` and ``evaluate`` use when given none."""
    return MeshPlacement(jax.local_devices()[:1], sync_steps=0)


def make_placement(mode: str = "none", devices: int = 0, *, members: int = 0, member_devices: int = 1,
                   model_devices: int = 1, rules=(), min_size: int = 1024) -> Placement:
    """The placement ``[parallel]`` names: ``"none"`` (one device), ``"sharding"`` (batch split
    over a ``data`` mesh axis, state replicated), ``"fsdp"`` (the state split too) or ``"pmap"``.

    ``devices``: local devices per process (0: all; ``"none"`` uses one).  ``members`` /
    ``member_devices``: an ensemble's member axis (sharding and fsdp); ``model_devices``,
    ``rules``, ``min_size``: fsdp only (see :class:`~fundl.train.placement.mesh.MeshPlacement`).

    Examples:
        >>> p = make_placement("none")
        >>> p.num_devices, p.axis_name, p.sync_every
        (1, None, 0)
    """
    if members and mode == "pmap":
        raise ValueError("an ensemble or sweep trains under parallel.mode='sharding', 'fsdp' or 'none', not 'pmap' "
                         "(pmap maps the leading axis, which is the members' here)")
    if mode == "fsdp" or model_devices != 1 or rules:
        if mode != "fsdp":
            raise ValueError(f"parallel.model_devices and parallel.rules apply to parallel.mode='fsdp', not {mode!r}")
        return MeshPlacement(mesh_devices(devices), members=members, member_devices=member_devices,
                             model_devices=model_devices, rules=rules, split_state=True, min_size=min_size)
    if mode == "none":
        if jax.process_count() > 1:
            raise ValueError(
                f"this is a {jax.process_count()}-process run but parallel.mode='none' would train each "
                f"process on its own slice; set parallel.mode='sharding' or 'pmap'")
        return single_device()
    if mode == "pmap":
        return PmapPlacement(devices)
    if mode == "sharding":
        return MeshPlacement(mesh_devices(devices), members=members, member_devices=member_devices)
    raise ValueError(f"parallel.mode must be 'none', 'pmap', 'sharding' or 'fsdp', got {mode!r}")
