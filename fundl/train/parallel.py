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
* ``host_metrics(metrics)``: per-step metrics as NumPy, from one shard.
"""

from __future__ import annotations

import jax
import numpy as np

from fundl.train.step import make_multi_step


class SingleDevice:
    """Everything on the default device; the step is ``jax.jit`` with the state donated."""

    num_devices = 1
    sync_every = 0  # dispatches between forced host syncs (0: only when logging)

    def compile_train(self, step, steps_per_call: int = 1, unroll=1):
        fn = step if steps_per_call == 1 else make_multi_step(step, unroll=True if unroll == 0 else unroll)
        return jax.jit(fn, donate_argnums=0)

    def compile_eval(self, eval_step):
        return jax.jit(eval_step)

    def put_state(self, state):
        return jax.device_put(state)

    def get_state(self, state):
        return state

    def put_batch(self, batch, stacked: bool = False):
        return batch

    def host_metrics(self, metrics):
        return jax.device_get(metrics)

    def check_batch_size(self, batch_size: int) -> None:
        pass


def local_batches_divisible(batch_size: int, num_devices: int) -> None:
    if batch_size % num_devices:
        raise ValueError(
            f"the global batch size {batch_size} must be divisible by the number of devices "
            f"{num_devices}; choose e.g. {max(num_devices, batch_size - batch_size % num_devices)}")


def stack_batches(batches: list[dict]) -> dict:
    """K host batches -> one batch whose leaves have a leading K axis."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}
