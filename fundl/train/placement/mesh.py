"""The mesh placement: ``jax.jit`` over a ``Mesh`` with a ``NamedSharding`` per state leaf.

One path for one device (a 1-device mesh), data parallelism (batch split on
``data``, state replicated), FSDP (leaves split by partition rules,
optionally on a ``data x model`` mesh) and ensembles (a ``members`` axis).
The step is always the plain single-device step (``axis_name=None``):
XLA's partitioner inserts the gradient reductions, the all-gathers of split
weights and global batch-norm statistics, so every mode equals one device.
In multi-host runs the mesh spans every process's devices (in process
order) and each process contributes its contiguous slice of the global
batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fundl.train.placement import arrays
from fundl.train.placement.contract import EvalView
from fundl.train.placement.rules import DATA, MEMBERS, MODEL, PartitionRules
from fundl.train.state import is_prng_key
from fundl.train.fusion import make_multi_step

# Optimiser steps between forced host syncs on several devices: queueing many collective steps
# without one deadlocked on CPU (docs/parallel.md).
SYNC_STEPS = 16


def mesh_devices(devices: int) -> list:
    """The first ``devices`` local devices of every process (0: all), in process order."""
    local = arrays.select_devices(devices)
    if jax.process_count() == 1:
        return list(local)
    by_process = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    counts = {p: len(ds) for p, ds in by_process.items()}
    if min(counts.values()) < len(local):
        raise ValueError(f"parallel.devices={devices} but some process has fewer devices: {counts}")
    return [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:len(local)]]


class MeshPlacement:
    """The :class:`~fundl.train.placement.contract.Placement` of ``jax.jit`` with ``NamedSharding``.

    ``devices``: the global devices of the mesh, in process order.  ``members > 0``: states
    and batches of an ensemble (a leading member axis, batches ``(members, B, ...)``): its
    members are replicated and each member's batch split on ``data`` (``member_devices =
    1``), or the devices form a ``members x data`` mesh with ``member_devices`` rows.
    ``model_devices = M > 1``: a ``data x model`` mesh (N/M x M) whose axis ``rules`` may
    name.  ``split_state``: the automatic FSDP rule (see
    :class:`~fundl.train.placement.rules.PartitionRules`).  ``sync_steps``: optimiser steps
    between forced host syncs (0: none).
    """

    axis_name = None  # XLA inserts the reductions: the step needs no collective

    def __init__(self, devices, *, members: int = 0, member_devices: int = 1, model_devices: int = 1,
                 rules=(), split_state: bool = False, min_size: int = 1024, sync_steps: int = SYNC_STEPS):
        self.devices = list(devices)
        self.num_devices = len(self.devices)
        self.num_local = sum(d.process_index == jax.process_index() for d in self.devices)
        self.members = members
        if member_devices < 1 or self.num_devices % member_devices or (members and members % member_devices):
            raise ValueError(f"parallel.member_devices={member_devices} must divide both the {self.num_devices} "
                             f"devices and the {members} ensemble members")
        if member_devices > 1 and not members:
            raise ValueError("parallel.member_devices > 1 needs an ensemble or a sweep (training.ensemble > 1)")
        if member_devices > 1 and jax.process_count() > 1:
            raise ValueError("parallel.member_devices > 1 is for one process; across processes use 1 "
                             "(members replicated, each member's batch split over the devices)")
        if model_devices < 1 or self.num_devices % model_devices:
            raise ValueError(f"parallel.model_devices={model_devices} must divide the {self.num_devices} devices")
        if model_devices > 1 and member_devices > 1:
            raise ValueError("parallel.model_devices > 1 and parallel.member_devices > 1 both ask for a second "
                             "mesh axis; use one of them")
        grid = np.array(self.devices)
        if member_devices > 1:
            self.mesh = jax.sharding.Mesh(grid.reshape(member_devices, -1), (MEMBERS, DATA))
        elif model_devices > 1:
            self.mesh = jax.sharding.Mesh(grid.reshape(-1, model_devices), (DATA, MODEL))
        else:
            self.mesh = jax.sharding.Mesh(grid, (DATA,))
        self.axes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
        self.data_devices = self.axes[DATA]
        self.rules = PartitionRules(self.axes, rules, split=split_state, min_size=min_size, members=members)
        self.splits_state = split_state
        self.sync_every = sync_steps
        lead = (MEMBERS if MEMBERS in self.axes else None,) if members else ()  # batches lead with the members
        # On one device every leaf is whole there: the plain single-device sharding, so that jit traces
        # the step as a plain jax.jit does (a mesh in the argument types misses the trace caches a plain
        # trace, e.g. fit's fusion probe, filled: docs/parallel.md).
        self.replicated = NamedSharding(self.mesh, P()) if self.num_devices > 1 else \
            SingleDeviceSharding(self.devices[0])
        self.eval_batch_sharding = NamedSharding(self.mesh, P(DATA))  # evaluation: one batch for all members
        self.batch_sharding = NamedSharding(self.mesh, P(*lead, DATA))
        self.stacked_sharding = NamedSharding(self.mesh, P(None, *lead, DATA))

    # ------------------------------------------------------------ layout
    def shardings(self, tree, prefix: str = ""):
        """The sharding of every leaf of ``tree`` (a state, or its ``prefix`` subtree, e.g.
        ``"params"``): a ``NamedSharding`` from the partition rules (on one device, where every
        leaf is whole, ``replicated``)."""
        def one(path, x):
            spec = self._spec(prefix, path, x)  # on one device too: a rule that does not fit is an error
            return NamedSharding(self.mesh, spec) if self.num_devices > 1 else self.replicated
        return jax.tree_util.tree_map_with_path(one, tree)

    def describe(self, state, limit: int = 0) -> list[str]:
        """``path: shape -> spec`` of each split leaf (the first ``limit``; 0: all)."""
        rows = []
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
            spec = self._spec("", path, x)
            if any(spec):
                rows.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')}: {tuple(np.shape(x))} -> "
                            f"{tuple(spec)}")
        return rows[:limit or None]

    def _spec(self, prefix: str, path, x) -> P:
        name = "/".join(filter(None, [prefix, jax.tree_util.keystr(path, simple=True, separator="/")]))
        floating = not is_prng_key(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        return self.rules.spec(name, tuple(np.shape(x)), floating)

    # ----------------------------------------------------------- compile
    def compile_train(self, step, steps_per_call: int = 1, unroll=1):
        if self.sync_every:  # count optimiser steps, not dispatches, when steps are fused
            self.sync_every = min(self.sync_every, max(1, SYNC_STEPS // max(1, steps_per_call)))
        fn = step if steps_per_call == 1 else make_multi_step(step, unroll=unroll)
        batch = self._batch_in(self.stacked_sharding if steps_per_call > 1 else self.batch_sharding)
        return JitForState(fn, lambda state, _: ((self.shardings(state), batch),
                                                 (self.shardings(state), self.replicated)), donate=True)

    def compile_eval(self, eval_step):
        batch = self._batch_in(self.eval_batch_sharding)
        return JitForState(eval_step, lambda params, model_state, _: (
            (self.shardings(params, "params"), self.shardings(model_state, "model_state"), batch),
            self.replicated))

    def _batch_in(self, sharding):
        """A batch's ``in_shardings`` entry: on one device none, so host batches go in as they
        are and ``jit`` copies them, as a plain ``jax.jit`` does."""
        return None if self.num_devices == 1 else sharding

    # ------------------------------------------------------------ states
    def put_state(self, state):
        return jax.tree.map(arrays.put, state, self.shardings(state))

    def get_state(self, state):
        """Whole arrays on this process's first device: one copy of a replicated leaf, split
        leaves gathered (across processes every process must call this together)."""
        device = jax.local_devices()[0]

        def plain(x):
            if not isinstance(x, jax.Array):
                return x
            if x.is_fully_replicated:
                return x.addressable_data(0)
            if x.is_fully_addressable:
                return jax.device_put(x, device)
            from jax.experimental import multihost_utils

            return jax.device_put(np.asarray(multihost_utils.process_allgather(x, tiled=True)), device)
        return jax.tree.map(plain, state)

    def eval_params(self, state):
        tree = (state.params, state.model_state)
        targets = (self.shardings(state.params, "params"), self.shardings(state.model_state, "model_state"))
        return jax.tree.map(lambda x, s: x if arrays.placed_as(x, s) else arrays.put(x, s), tree, targets)

    def saveable(self, state):
        """The state as placed (global arrays: every process writes its own part)."""
        return state

    def restore_target(self, template):
        return jax.tree.map(arrays.abstract, template, self.shardings(template))

    # ----------------------------------------------------------- batches
    def check_batch_size(self, batch_size: int) -> None:
        arrays.local_batches_divisible(batch_size, self.data_devices)

    def put_batch(self, batch, stacked: bool = False):
        """On one device the host batch as it is; else one global array per leaf, this process's
        batch split on ``data``."""
        if self.num_devices == 1:
            return batch
        sharding = self.stacked_sharding if stacked else self.batch_sharding
        axis = int(stacked) + (1 if self.members else 0)
        return self._global(batch, sharding, axis)

    def _put_eval_batch(self, batch):
        """An evaluation batch (this process's part, shared by an ensemble's members) as the eval step takes it."""
        return batch if self.num_devices == 1 else self._global(batch, self.eval_batch_sharding, 0)

    def _global(self, batch, sharding, axis: int):
        local_data = self.num_local * self.data_devices // self.num_devices  # this process's rows of 'data'
        arrays.split_evenly(np.shape(next(iter(batch.values())))[axis], local_data)
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

    def host_metrics(self, metrics):
        return jax.device_get(jax.tree.map(_one_copy, metrics))

    def for_eval(self) -> EvalView:
        put = lambda batch, stacked=False: self._put_eval_batch(arrays.process_slice(batch))  # noqa: E731
        return EvalView(self.num_devices, put, self.host_metrics)


def _one_copy(x):
    """This process's first copy of a replicated output (a global array cannot be fetched whole)."""
    return x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x


class JitForState:
    """``jax.jit`` whose shardings follow the state's tree (one sharding per leaf), built at the
    first call from its arguments: ``shardings(*args) -> (in_shardings, out_shardings)``."""

    def __init__(self, fn, shardings, donate: bool = False):
        self.fn, self.shardings, self.donate, self.jitted = fn, shardings, donate, None

    def _jit(self, args):
        if self.jitted is None:
            ins, outs = self.shardings(*args)
            self.jitted = jax.jit(self.fn, in_shardings=ins, out_shardings=outs,
                                  donate_argnums=0 if self.donate else ())
        return self.jitted

    def __call__(self, *args):
        return self._jit(args)(*args)

    def lower(self, *args):
        """``jax.jit(...).lower`` of the step for these arguments (e.g. for XLA's memory analysis)."""
        return self._jit(args).lower(*args)
