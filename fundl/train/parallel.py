"""How a training step is placed on devices.

A *placement* turns pure steps into compiled callables and moves states and
batches where they belong.  The loop only talks to this interface, so the
single-device, ``pmap`` and ``jit``-with-shardings paths share one loop:

* ``compile_train(step, steps_per_call, unroll)`` -> ``fn(state, batch) -> (state, metrics)``
  (with ``steps_per_call = K > 1`` the batch leaves carry a leading K axis
  and the metrics come back stacked (K, ...));
* ``compile_eval(eval_step)`` -> ``fn(params, model_state, batch) -> sums``;
* ``put_state`` / ``get_state``: to the devices / back to one plain state;
* ``put_batch(batch, stacked)``: a host batch (NumPy) to what ``fn`` takes;
* ``host_metrics(metrics)``: per-step metrics as NumPy, from one shard;
* ``check_batch_size(B)``, ``num_devices`` (global), ``sync_every``
  (dispatches between forced host syncs), ``eval_params(state)`` and
  ``for_eval()`` (the view ``evaluate`` takes: it hands out global batches).

``eval_params(state)`` -> ``(params, model_state)`` in the form
``compile_eval``'s function takes: leaves that are already placed (the state
``fit`` holds on the devices and hands its ``eval_fn``) are used as they are,
without a copy; plain leaves (a restored checkpoint, ``get_state``'s copy)
are placed from the host.

``saveable(state)`` / ``restore_target(template)``: the state as global
arrays every process passes to a checkpoint save, and the abstract leaves
(``ShapeDtypeStruct`` with a sharding) to restore it onto.

``make_placement(mode, devices)`` builds one of :class:`SingleDevice`,
:class:`PmapPlacement` (``jax.pmap``, the step averages over the named axis
``"batch"``), :class:`ShardingPlacement` (``jax.jit`` with a ``Mesh`` and
``NamedSharding``; the plain single-device step, XLA inserts the reductions)
and :class:`FsdpPlacement` (the same with parameters and optimiser state
split over the devices).  All give the same parameters on the same global
batches (see ``tests/test_parallel.py``, ``tests/test_fsdp.py`` and
``docs/parallel.md``).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fundl.train.state import is_prng_key
from fundl.train.fusion import make_multi_step


class SingleDevice:
    """Everything on the default device; the step is ``jax.jit`` with the state donated."""

    num_devices = 1
    axis_name = None  # the step needs no collective
    sync_every = 0  # dispatches between forced host syncs (0: only when logging)

    def compile_train(self, step, steps_per_call: int = 1, unroll=1):
        fn = step if steps_per_call == 1 else make_multi_step(step, unroll=unroll)
        return jax.jit(fn, donate_argnums=0)

    def compile_eval(self, eval_step):
        return jax.jit(eval_step)

    def put_state(self, state):
        """A copy on the device: the donating step must not delete the caller's arrays."""
        return jax.device_put(state, may_alias=False)

    def get_state(self, state):
        return state

    def put_batch(self, batch, stacked: bool = False):
        return batch

    def host_metrics(self, metrics):
        return jax.device_get(metrics)

    def check_batch_size(self, batch_size: int) -> None:
        pass

    def eval_params(self, state):
        return state.params, state.model_state

    def for_eval(self):
        return self

    def saveable(self, state):
        """The state as a checkpoint stores it: global ``jax.Array`` leaves every process passes to save."""
        return state

    def restore_target(self, template):
        """``ShapeDtypeStruct`` leaves (with the sharding to restore onto) shaped like ``saveable(template)``."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda x: _abstract(x, device), template)


# ------------------------------------------------------------------ helpers
SYNC_STEPS = 16  # optimiser steps between forced host syncs on multi-device placements


def _to_host(x):
    """A leaf as NumPy (typed PRNG keys stay keys: they are handled by ``_place``)."""
    if is_prng_key(x):
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _place(x, sharding, leading: int | None = None):
    """Copy the host value ``x`` onto every device of ``sharding``.

    ``leading=n`` broadcasts to a new leading axis of n (one slice per device,
    for ``pmap``); ``None`` places ``x`` as it is (for a replicated
    ``NamedSharding``).  Built with ``make_array_from_callback``, which works
    for multi-process shardings too (each process fills its own devices), so
    no cross-host transfer or equality check is needed.  Typed PRNG keys
    travel as their key data and are re-wrapped on the devices.
    """
    if is_prng_key(x):
        data = _place(jax.random.key_data(x), sharding, leading)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = _to_host(x)
    if leading is not None:
        x = np.broadcast_to(x, (leading,) + x.shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x[index]))


def _abstract(x, sharding) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype (a typed PRNG key keeps its key dtype) with ``sharding``."""
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype,
                                sharding=sharding)


def state_bytes(state, shardings=None) -> tuple[int, int]:
    """``(bytes on one device, bytes of one whole copy)`` of a state's leaves: the first device's
    shards against the full arrays (replicated leaves count whole on every device).  The shards
    are those of the placed leaves, or of ``shardings`` (a tree like ``state``) when given."""
    shardings = jax.tree.map(lambda x: x.sharding, state) if shardings is None else shardings
    per_device = total = 0
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        shape, itemsize = np.shape(x), _itemsize(x)
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
        per_device += int(np.prod(s.shard_shape(shape), dtype=np.int64)) * itemsize
    return per_device, total


def _itemsize(x) -> int:
    """Bytes per element (a typed PRNG key: of its key data)."""
    if is_prng_key(x):
        data = jax.random.key_data(x)
        return int(np.prod(data.shape[np.ndim(x):], dtype=np.int64)) * data.dtype.itemsize
    return np.dtype(x.dtype).itemsize


def _select_devices(devices: int) -> list:
    """The first ``devices`` local devices of this process (0: all of them)."""
    local = jax.local_devices()
    if devices < 0 or devices > len(local):
        raise ValueError(
            f"parallel.devices={devices} but this process has {len(local)} local device(s) "
            f"({local[0].platform}); use 0 for all, or at most {len(local)}. On CPU, fake devices come from "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N or --local-devices N (scripts/train.py)")
    return local[:devices or len(local)]


def _split_evenly(size: int, parts: int) -> None:
    if size % parts:
        raise ValueError(f"a local batch of {size} examples cannot be split evenly over {parts} local devices")


def local_batches_divisible(batch_size: int, num_devices: int) -> None:
    """The check of ``placement.check_batch_size``, run before training."""
    if batch_size % num_devices:
        lower = batch_size - batch_size % num_devices
        raise ValueError(
            f"the global batch size {batch_size} must be divisible by the number of devices "
            f"{num_devices} (each device gets an equal share); choose e.g. "
            f"{lower or num_devices} or {lower + num_devices}")


class _MultiDevice:
    """What the pmap and sharding placements share: devices, sizes, syncs."""

    num_devices: int          # global: all processes together
    num_local: int            # this process's devices
    sync_every = SYNC_STEPS

    def _set_sync(self, steps_per_call: int) -> None:
        # Queueing ~48 collective steps without a host sync deadlocked on CPU (docs/parallel.md);
        # count optimiser steps, not dispatches, when steps are fused.
        self.sync_every = min(self.sync_every, max(1, SYNC_STEPS // max(1, steps_per_call)))

    def check_batch_size(self, batch_size: int) -> None:
        local_batches_divisible(batch_size, self.num_devices)

    def put_global_batch(self, batch: dict):
        """A *global* host batch (every process holds all of it, e.g. evaluation):
        keep this process's contiguous slice, then ``put_batch``."""
        p, n = jax.process_index(), jax.process_count()
        if n > 1:
            size = len(next(iter(batch.values())))
            if size % n:
                raise ValueError(f"a global batch of {size} cannot be split over {n} processes")
            per = size // n
            batch = {k: v[p * per:(p + 1) * per] for k, v in batch.items()}
        return self.put_eval_batch(batch)

    def for_eval(self):
        """The view ``fundl.train.loop.evaluate`` should get: it hands out global batches."""
        return _GlobalBatches(self)


class _GlobalBatches:
    def __init__(self, placement):
        self._placement = placement
        self.num_devices = placement.num_devices

    def put_batch(self, batch, stacked: bool = False):
        return self._placement.put_global_batch(batch)

    def host_metrics(self, metrics):
        return self._placement.host_metrics(metrics)


# --------------------------------------------------------------------- pmap
class PmapPlacement(_MultiDevice):
    """``jax.pmap`` over the local devices (all devices of all processes in multi-host runs).

    * the train state is *broadcast*: every leaf gets a leading device axis and
      one copy per device (``make_array_from_callback``), the replacement for
      the removed ``jax.device_put_replicated``;
    * a host batch (B_local, ...) becomes (D, B_local/D, ...), split on the
      leading axis; K fused steps take (K, B_local, ...) -> (D, K, B_local/D, ...);
    * the step is built with ``axis_name=PmapPlacement.axis_name`` so gradients,
      metrics and batch-norm statistics are ``lax.pmean``-ed over devices and
      each device folds its index into the step key;
    * logged values come from the first addressable shard (``addressable_data(0)``),
      which is valid in multi-process runs where ``x[0]`` is not.
    """

    axis_name = "batch"

    def __init__(self, devices: int = 0):
        self.devices = _select_devices(devices)
        self.num_local = len(self.devices)
        if jax.process_count() > 1 and self.num_local != jax.local_device_count():
            raise ValueError(
                f"parallel.mode='pmap' across {jax.process_count()} processes uses every local device "
                f"({jax.local_device_count()} here); set parallel.devices=0 or use parallel.mode='sharding'")
        self.num_devices = self.num_local * jax.process_count()
        mesh = jax.sharding.Mesh(np.array(self.devices), (self.axis_name,))
        self._sharded = NamedSharding(mesh, P(self.axis_name))

    def _pmap(self, fn, donate=()):
        # With several processes pmap must span all global devices (devices=None).
        devices = None if jax.process_count() > 1 else self.devices
        return jax.pmap(fn, axis_name=self.axis_name, devices=devices, donate_argnums=donate)

    def compile_train(self, step, steps_per_call: int = 1, unroll=1):
        self._set_sync(steps_per_call)
        fn = step if steps_per_call == 1 else make_multi_step(step, unroll=unroll)
        return self._pmap(fn, donate=0)

    def compile_eval(self, eval_step):
        return self._pmap(eval_step)

    def _replicate(self, tree):
        return jax.tree.map(lambda x: _place(x, self._sharded, self.num_local), tree)

    def _placed(self, x) -> bool:
        s = getattr(x, "sharding", None)
        return isinstance(s, NamedSharding) and len(s.spec) > 0 and s.spec[0] == self.axis_name

    def put_state(self, state):
        return self._replicate(state)

    def eval_params(self, state):
        """Broadcast leaves (the device state ``fit`` holds) as they are; plain leaves are broadcast."""
        return jax.tree.map(lambda x: x if self._placed(x) else _place(x, self._sharded, self.num_local),
                            (state.params, state.model_state))

    def get_state(self, state):
        """One plain copy of a broadcast state (device 0's; all copies are equal)."""
        return jax.tree.map(lambda x: x.addressable_data(0)[0] if self._placed(x) else x, state)

    def put_batch(self, batch, stacked: bool = False):
        d = self.num_local

        def split(a):
            a = np.asarray(a)
            if stacked:  # (K, B, ...) -> (D, K, B/D, ...): pmap maps the leading axis
                a = a.reshape((a.shape[0], d, a.shape[1] // d) + a.shape[2:]).swapaxes(0, 1)
            else:
                a = a.reshape((d, a.shape[0] // d) + a.shape[1:])
            return jax.device_put(a, self._sharded)

        first = np.shape(next(iter(batch.values())))
        _split_evenly(first[1] if stacked else first[0], d)
        return {k: split(v) for k, v in batch.items()}

    def put_eval_batch(self, batch):
        return self.put_batch(batch)

    def host_metrics(self, metrics):
        return jax.tree.map(lambda m: np.asarray(np.asarray(m.addressable_data(0))[0]), metrics)

    def _global_replicated(self):
        return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), P())

    def saveable(self, state):
        """One copy of the broadcast state, replicated over every device of every process."""
        sharding = self._global_replicated()
        return jax.tree.map(lambda x: _place(self.get_state(x) if self._placed(x) else x, sharding), state)

    def restore_target(self, template):
        sharding = self._global_replicated()
        return jax.tree.map(lambda x: _abstract(self.get_state(x) if self._placed(x) else x, sharding), template)


# ------------------------------------------------------------------ sharding
class ShardingPlacement(_MultiDevice):
    """``jax.jit`` over a ``Mesh`` with ``NamedSharding``: batch split on ``data``, state replicated.

    The step is the plain single-device step (``axis_name=None``): XLA's
    partitioner inserts the gradient all-reduce itself, and batch-norm
    statistics are global-batch statistics without any ``pmean``.  The state
    is donated.  In multi-host runs the mesh spans every process's devices
    (in process order) and each process contributes its contiguous slice of
    the global batch (``jax.make_array_from_process_local_data``).
    """

    axis_name = None
    data_axis = "data"
    member_axis = "members"

    def __init__(self, devices: int = 0, *, members: int = 0, member_devices: int = 1):
        """``members`` > 0: the state and batches of an ensemble (a leading member axis, batches
        ``(members, B, ...)``).  Its members are replicated over the devices and each member's batch
        is split on ``data`` (``member_devices = 1``), or the devices form a ``members x data`` mesh
        with ``member_devices`` rows and each row holds ``members / member_devices`` members."""
        local = _select_devices(devices)
        self.num_local = len(local)
        if jax.process_count() > 1:
            by_process = {}
            for d in jax.devices():
                by_process.setdefault(d.process_index, []).append(d)
            counts = {p: len(ds) for p, ds in by_process.items()}
            if min(counts.values()) < self.num_local:
                raise ValueError(f"parallel.devices={devices} but some process has fewer devices: {counts}")
            self.devices = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:self.num_local]]
        else:
            self.devices = list(local)
        self.num_devices = len(self.devices)
        self.members, self.member_devices = members, member_devices
        if member_devices < 1 or self.num_devices % member_devices or (members and members % member_devices):
            raise ValueError(f"parallel.member_devices={member_devices} must divide both the {self.num_devices} "
                             f"devices and the {members} ensemble members")
        if member_devices > 1 and not members:
            raise ValueError("parallel.member_devices > 1 needs an ensemble or a sweep (training.ensemble > 1)")
        if member_devices > 1 and jax.process_count() > 1:
            raise ValueError("parallel.member_devices > 1 is for one process; across processes use 1 "
                             "(members replicated, each member's batch split over the devices)")
        if member_devices > 1:
            grid = np.array(self.devices).reshape(member_devices, self.num_devices // member_devices)
            self._set_mesh(jax.sharding.Mesh(grid, (self.member_axis, self.data_axis)), member_devices)
        else:
            self._set_mesh(jax.sharding.Mesh(np.array(self.devices), (self.data_axis,)), 1)

    def _set_mesh(self, mesh, other_axis: int) -> None:
        """The shardings of states and batches on ``mesh``, whose second axis (members or model,
        if any) has ``other_axis`` devices: ``num_devices / other_axis`` are on ``data``."""
        self.mesh, self.data_devices = mesh, self.num_devices // other_axis
        m = self.member_axis if self.member_axis in mesh.axis_names else None
        lead = (m,) if self.members else ()  # an ensemble's batches lead with the member axis
        self.replicated = NamedSharding(mesh, P())
        self.state_sharding = NamedSharding(mesh, P(m)) if m else self.replicated
        self.batch_sharding = NamedSharding(mesh, P(self.data_axis))  # evaluation: one batch for all
        self.train_sharding = NamedSharding(mesh, P(*lead, self.data_axis))
        self.stacked_sharding = NamedSharding(mesh, P(None, *lead, self.data_axis))

    def compile_train(self, step, steps_per_call: int = 1, unroll=1):
        self._set_sync(steps_per_call)
        fn, batch = (step, self.train_sharding) if steps_per_call == 1 else \
            (make_multi_step(step, unroll=unroll), self.stacked_sharding)
        return jax.jit(fn, in_shardings=(self.state_sharding, batch),
                       out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

    def compile_eval(self, eval_step):
        return jax.jit(eval_step, in_shardings=(self.state_sharding, self.state_sharding, self.batch_sharding),
                       out_shardings=self.replicated)

    def put_state(self, state):
        return jax.tree.map(lambda x: _place(x, self.state_sharding), state)

    def _placed(self, x) -> bool:
        return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(self.state_sharding, x.ndim)

    def eval_params(self, state):
        """Leaves placed as the train state is (the device state ``fit`` holds) as they are; plain
        leaves are placed so."""
        return jax.tree.map(lambda x: x if self._placed(x) else _place(x, self.state_sharding),
                            (state.params, state.model_state))

    def get_state(self, state):
        """The state as plain single-device arrays: this process's first copy of a replicated
        leaf, all members of a member-sharded one."""
        def plain(x):
            if not isinstance(x, jax.Array):
                return x
            return jax.device_put(np.asarray(x)) if self.member_devices > 1 else x.addressable_data(0)
        return jax.tree.map(plain, state)

    def put_batch(self, batch, stacked: bool = False):
        sharding = self.stacked_sharding if stacked else self.train_sharding
        axis = int(stacked) + (1 if self.members else 0)
        _split_evenly(np.shape(next(iter(batch.values())))[axis], self.num_local // self.member_devices)
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

    def put_eval_batch(self, batch):
        _split_evenly(np.shape(next(iter(batch.values())))[0], self.num_local // self.member_devices)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in batch.items()}

    def check_batch_size(self, batch_size: int) -> None:
        local_batches_divisible(batch_size, self.data_devices)

    def host_metrics(self, metrics):
        return jax.tree.map(lambda m: np.asarray(m.addressable_data(0)), metrics)

    def saveable(self, state):
        """The state as placed (global arrays: every process writes its own part)."""
        return state

    def restore_target(self, template):
        return jax.tree.map(lambda x: _abstract(x, self.state_sharding), template)


# ---------------------------------------------------------------------- fsdp
class FsdpPlacement(ShardingPlacement):
    """Sharded parameters (ZeRO-3 style): ``jit`` with a ``NamedSharding`` per state leaf.

    Parameters, optimiser state and model state are split over the ``data``
    axis, so each device holds about 1/N of them; XLA's partitioner inserts
    the all-gathers before a layer uses its weights and the reduce-scatters
    of the gradients.  The step is the plain single-device step, so the
    result equals one device (``tests/test_fsdp.py``).

    Each leaf's ``PartitionSpec`` comes from the first of ``rules`` whose
    regex matches the leaf's tree path (``re.search`` on e.g.
    ``params/layers/0/w`` or ``opt_state/0/mu/layers/0/w``: an unanchored
    pattern covers a parameter and its optimiser moments), else from the
    automatic rule: shard the largest dimension that divides evenly over the
    ``data`` axis; leaves smaller than ``min_size`` elements, integer leaves
    (step counters, PRNG key data) and leaves with no such dimension stay
    replicated.  With
    ``model_devices = M > 1`` the mesh is ``data x model`` (N/M x M) and
    rules may name ``"model"`` too (tensor parallelism by path, as
    big_vision's and MaxText's partition rules); batches are split on
    ``data`` only.  An ensemble's member axis (dim 0) is never split by the
    automatic rule; rules describe a parameter's own dimensions.
    """

    model_axis = "model"

    def __init__(self, devices: int = 0, *, members: int = 0, member_devices: int = 1, model_devices: int = 1,
                 rules=(), min_size: int = 1024):
        super().__init__(devices, members=members, member_devices=member_devices)
        if model_devices < 1 or self.num_devices % model_devices:
            raise ValueError(f"parallel.model_devices={model_devices} must divide the {self.num_devices} devices")
        if model_devices > 1 and member_devices > 1:
            raise ValueError("parallel.model_devices > 1 and parallel.member_devices > 1 both ask for a second "
                             "mesh axis; use one of them")
        self.model_devices, self.min_size = model_devices, min_size
        if model_devices > 1:
            grid = np.array(self.devices).reshape(self.num_devices // model_devices, model_devices)
            self._set_mesh(jax.sharding.Mesh(grid, (self.data_axis, self.model_axis)), model_devices)
        self.axes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
        self.rules = [self._check_rule(i, rule) for i, rule in enumerate(rules)]

    def _check_rule(self, i: int, rule):
        where = f"parallel.rules[{i}]"
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
                and isinstance(rule[1], (list, tuple))):
            raise ValueError(f"{where} must be [REGEX, [AXIS_OR_EMPTY, ...]], e.g. ['dense.*/w$', ['data', 'model']], "
                             f"got {rule!r}")
        pattern, spec = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}: {pattern!r} is not a regular expression ({e})") from None
        allowed = [a for a in (self.data_axis, self.model_axis) if a in self.axes]
        for axis in spec:
            if axis not in ("", *allowed):
                raise ValueError(f"{where}: axis {axis!r} is not a mesh axis; expected one of {allowed} or '' "
                                 f"(not split), e.g. ['', 'model']" +
                                 (" (set parallel.model_devices > 1 for a 'model' axis)" if axis == "model" else ""))
        return regex, tuple(a or None for a in spec), pattern

    # --------------------------------------------------------- shardings
    def _leaf_spec(self, path: str, shape: tuple, floating: bool) -> P:
        lead = (self.member_axis if self.member_devices > 1 else None,) if self.members else ()
        own = shape[len(lead):]
        for regex, spec, pattern in self.rules:
            if regex.search(path):
                if len(spec) > len(own):
                    raise ValueError(f"parallel.rules: {pattern!r} matches {path} of shape {own} but its spec "
                                     f"{list(spec)} has {len(spec)} entries (at most {len(own)})")
                for dim, axis in enumerate(spec):
                    if axis and own[dim] % self.axes[axis]:
                        raise ValueError(f"parallel.rules: {pattern!r} splits dimension {dim} of {path} "
                                         f"(shape {own}) over '{axis}' ({self.axes[axis]} devices), which does "
                                         f"not divide {own[dim]}")
                return P(*lead, *spec)
        n = self.axes[self.data_axis]
        if not floating or n == 1 or int(np.prod(own, dtype=np.int64)) < max(self.min_size, 1):
            return P(*lead)
        fits = [d for d in range(len(own)) if own[d] % n == 0]
        if not fits:
            return P(*lead)
        best = max(fits, key=lambda d: (own[d], -d))  # the largest; the first of equals
        return P(*lead, *([None] * best), self.data_axis)

    def shardings(self, tree, prefix: str = ""):
        """The ``NamedSharding`` of every leaf of ``tree`` (a state, or its ``prefix`` subtree)."""
        def one(path, x):
            name = "/".join(filter(None, [prefix, jax.tree_util.keystr(path, simple=True, separator="/")]))
            floating = not is_prng_key(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
            return NamedSharding(self.mesh, self._leaf_spec(name, tuple(np.shape(x)), floating))
        return jax.tree_util.tree_map_with_path(one, tree)

    def describe(self, state, limit: int = 0) -> list[str]:
        """``path: shape -> spec`` of each sharded leaf (the first ``limit``; 0: all)."""
        rows = []
        for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(self.shardings(state))):
            if any(s.spec):
                rows.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')}: {tuple(np.shape(x))} -> "
                            f"{tuple(s.spec)}")
        return rows[:limit or None]

    # --------------------------------------------------------- compile
    def compile_train(self, step, steps_per_call: int = 1, unroll=1):
        self._set_sync(steps_per_call)
        fn, batch = (step, self.train_sharding) if steps_per_call == 1 else \
            (make_multi_step(step, unroll=unroll), self.stacked_sharding)
        return _JitPerState(fn, lambda state, _: ((self.shardings(state), batch),
                                                  (self.shardings(state), self.replicated)), donate=True)

    def compile_eval(self, eval_step):
        return _JitPerState(eval_step, lambda params, model_state, _: (
            (self.shardings(params, "params"), self.shardings(model_state, "model_state"), self.batch_sharding),
            self.replicated))

    # ----------------------------------------------------------- states
    def _on_mesh(self, x) -> bool:
        return isinstance(x, jax.Array) and not is_prng_key(x) and \
            x.sharding.device_set == set(self.mesh.devices.flat)

    def _put(self, x, sharding):
        if self._on_mesh(x):  # already on these devices: reshard (or copy) there, no host trip
            return jax.device_put(x, sharding, may_alias=False)
        return _place(x, sharding)

    def put_state(self, state):
        return jax.tree.map(self._put, state, self.shardings(state))

    @staticmethod
    def _placed_as(x, sharding) -> bool:
        return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)

    def eval_params(self, state):
        tree = (state.params, state.model_state)
        targets = (self.shardings(state.params, "params"), self.shardings(state.model_state, "model_state"))
        return jax.tree.map(lambda x, s: x if self._placed_as(x, s) else _place(x, s), tree, targets)

    def get_state(self, state):
        """Whole arrays on this process's first device (sharded leaves are gathered: every
        process must call this together in a multi-process run)."""
        device = jax.local_devices()[0]

        def plain(x):
            if not isinstance(x, jax.Array) or x.is_fully_replicated:
                return x.addressable_data(0) if isinstance(x, jax.Array) else x
            if x.is_fully_addressable:
                return jax.device_put(x, device)
            from jax.experimental import multihost_utils

            return jax.device_put(np.asarray(multihost_utils.process_allgather(x, tiled=True)), device)
        return jax.tree.map(plain, state)

    def restore_target(self, template):
        return jax.tree.map(_abstract, template, self.shardings(template))


class _JitPerState:
    """``jax.jit`` whose shardings depend on the state's tree (one sharding per leaf): built at
    the first call from its arguments (``shardings(*args) -> (in_shardings, out_shardings)``)."""

    def __init__(self, fn, shardings, donate: bool = False):
        self.fn, self._shardings, self._donate, self._jitted = fn, shardings, donate, None

    def _jit(self, args):
        if self._jitted is None:
            ins, outs = self._shardings(*args)
            self._jitted = jax.jit(self.fn, in_shardings=ins, out_shardings=outs,
                                   donate_argnums=0 if self._donate else ())
        return self._jitted

    def __call__(self, *args):
        return self._jit(args)(*args)

    def lower(self, *args):
        return self._jit(args).lower(*args)


# ------------------------------------------------------------------- factory
def make_placement(mode: str = "none", devices: int = 0, *, members: int = 0, member_devices: int = 1,
                   model_devices: int = 1, rules=(), min_size: int = 1024):
    """``"none"`` -> :class:`SingleDevice`, ``"pmap"`` -> :class:`PmapPlacement`,
    ``"sharding"`` -> :class:`ShardingPlacement`, ``"fsdp"`` -> :class:`FsdpPlacement`;
    ``devices`` local devices per process (0: all).  ``members``/``member_devices``: an
    ensemble's member axis (sharding and fsdp, see ShardingPlacement); ``model_devices``,
    ``rules``, ``min_size``: fsdp only (see FsdpPlacement)."""
    if members and mode == "pmap":
        raise ValueError("an ensemble or sweep trains under parallel.mode='sharding', 'fsdp' or 'none', not 'pmap' "
                         "(pmap maps the leading axis, which is the members' here)")
    if mode == "fsdp" or model_devices != 1 or rules:
        if mode != "fsdp":
            raise ValueError(f"parallel.model_devices and parallel.rules apply to parallel.mode='fsdp', not {mode!r}")
        return FsdpPlacement(devices, members=members, member_devices=member_devices, model_devices=model_devices,
                             rules=rules, min_size=min_size)
    if mode == "none":
        if jax.process_count() > 1:
            raise ValueError(
                f"this is a {jax.process_count()}-process run but parallel.mode='none' would train each "
                f"process on its own slice; set parallel.mode='sharding' or 'pmap'")
        return SingleDevice()
    if mode == "pmap":
        return PmapPlacement(devices)
    if mode == "sharding":
        return ShardingPlacement(devices, members=members, member_devices=member_devices)
    raise ValueError(f"parallel.mode must be 'none', 'pmap', 'sharding' or 'fsdp', got {mode!r}")
