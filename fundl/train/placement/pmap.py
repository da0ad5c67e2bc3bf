"""The pmap placement: ``jax.pmap`` over the local devices, kept because users ask for it.

* the train state is *broadcast*: every leaf gets a leading device axis and
  one copy per device (``make_array_from_callback``), the replacement for the
  removed ``jax.device_put_replicated``;
* a host batch (B_local, ...) becomes (D, B_local/D, ...), split on the
  leading axis; K fused steps take (K, B_local, ...) -> (D, K, B_local/D, ...);
* the step is built with ``axis_name=PmapPlacement.axis_name`` so gradients,
  metrics and batch-norm statistics are ``lax.pmean``-ed over devices and
  each device folds its index into the step key;
* logged values come from the first addressable shard (``addressable_data(0)``),
  which is valid in multi-process runs where ``x[0]`` is not.

In multi-host runs pmap spans all devices of all processes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fundl.train.placement import arrays
from fundl.train.placement.contract import EvalView
from fundl.train.placement.mesh import SYNC_STEPS
from fundl.train.fusion import make_multi_step


class PmapPlacement:
    """The :class:`~fundl.train.placement.contract.Placement` of ``jax.pmap`` on ``devices`` local devices (0: all)."""

    axis_name = "batch"
    splits_state = False

    def __init__(self, devices: int = 0):
        self.devices = arrays.select_devices(devices)
        self.num_local = len(self.devices)
        if jax.process_count() > 1 and self.num_local != jax.local_device_count():
            raise ValueError(
                f"parallel.mode='pmap' across {jax.process_count()} processes uses every local device "
                f"({jax.local_device_count()} here); set parallel.devices=0 or use parallel.mode='sharding'")
        self.num_devices = self.data_devices = self.num_local * jax.process_count()
        self.sync_every = SYNC_STEPS
        mesh = jax.sharding.Mesh(np.array(self.devices), (self.axis_name,))
        self._sharded = NamedSharding(mesh, P(self.axis_name))

    def _pmap(self, fn, donate=()):
        # With several processes pmap must span all global devices (devices=None).
        devices = None if jax.process_count() > 1 else self.devices
        return jax.pmap(fn, axis_name=self.axis_name, devices=devices, donate_argnums=donate)

    def compile_train(self, step, steps_per_call: int = 1, unroll=1):
        # count optimiser steps, not dispatches, when steps are fused
        self.sync_every = min(self.sync_every, max(1, SYNC_STEPS // max(1, steps_per_call)))
        fn = step if steps_per_call == 1 else make_multi_step(step, unroll=unroll)
        return self._pmap(fn, donate=0)

    def compile_eval(self, eval_step):
        return self._pmap(eval_step)

    def _broadcast(self, x):
        return arrays.put(x, self._sharded, self.num_local)

    def _placed(self, x) -> bool:
        s = getattr(x, "sharding", None)
        return isinstance(s, NamedSharding) and len(s.spec) > 0 and s.spec[0] == self.axis_name

    def put_state(self, state):
        return jax.tree.map(self._broadcast, state)

    def eval_params(self, state):
        """Broadcast leaves (the device state ``fit`` holds) as they are; plain leaves are broadcast."""
        return jax.tree.map(lambda x: x if self._placed(x) else self._broadcast(x), (state.params, state.model_state))

    def get_state(self, state):
        """One plain copy of a broadcast state (device 0's; all copies are equal)."""
        return jax.tree.map(lambda x: x.addressable_data(0)[0] if self._placed(x) else x, state)

    def check_batch_size(self, batch_size: int) -> None:
        arrays.local_batches_divisible(batch_size, self.num_devices)

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
        arrays.split_evenly(first[1] if stacked else first[0], d)
        return {k: split(v) for k, v in batch.items()}

    def host_metrics(self, metrics):
        return jax.tree.map(lambda m: np.asarray(np.asarray(m.addressable_data(0))[0]), metrics)

    def for_eval(self) -> EvalView:
        return EvalView(self.num_devices, lambda batch, stacked=False: self.put_batch(arrays.process_slice(batch)),
                        self.host_metrics)

    def _global_replicated(self):
        return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), P())

    def saveable(self, state):
        """One copy of the broadcast state, replicated over every device of every process."""
        sharding = self._global_replicated()
        return jax.tree.map(lambda x: arrays.put(self.get_state(x) if self._placed(x) else x, sharding), state)

    def restore_target(self, template):
        sharding = self._global_replicated()
        return jax.tree.map(lambda x: arrays.abstract(self.get_state(x) if self._placed(x) else x, sharding),
                            template)
