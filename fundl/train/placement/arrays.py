"""Moving values between the host and placed devices, and the checks placements share.

Every copy of a state leaf onto devices goes through :func:`put`, which works
when a sharding spans several processes (each process fills its own devices),
so no cross-host transfer or equality check is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fundl.train.state import is_prng_key


def put(x, sharding, leading: int | None = None):
    """A copy of ``x`` (a host value or an array) laid out as ``sharding``.

    ``leading=n`` broadcasts to a new leading axis of n (one slice per device,
    for ``pmap``).  A one-device sharding is a plain ``jax.device_put``; an array
    already on ``sharding``'s devices is copied and resharded there; anything
    else is built from this process's host copy (``make_array_from_callback``,
    which works when the sharding spans several processes: each fills its own
    devices).  Typed PRNG keys travel as their key data and are re-wrapped.
    The result never shares a buffer with ``x``, which a donating step may delete.
    """
    if leading is None and len(sharding.device_set) == 1:
        return jax.device_put(x, sharding, may_alias=False)
    if is_prng_key(x):
        data = put(jax.random.key_data(x), sharding, leading)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if leading is None and isinstance(x, jax.Array) and x.sharding.device_set == sharding.device_set:
        # device_put(may_alias=False) onto several devices may still reuse x's buffer: copy first
        return jax.device_put(jnp.array(x, copy=True), sharding)
    x = to_host(x)
    if leading is not None:
        x = np.broadcast_to(x, (leading,) + x.shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x[index]))


def to_host(x):
    """A leaf as NumPy, from this process's first shard when the array spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def placed_as(x, sharding) -> bool:
    """True when ``x`` is an array with exactly ``sharding`` (then it is used without a copy).  Not
    merely an equivalent one: ``jit`` compiles again for an argument whose sharding differs in type."""
    return isinstance(x, jax.Array) and x.sharding == sharding


def abstract(x, sharding) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype (a typed PRNG key keeps its key dtype) with ``sharding``: a restore target."""
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype,
                                sharding=sharding)


def state_bytes(state, shardings=None) -> tuple[int, int]:
    """``(bytes on one device, bytes of one whole copy)`` of a state's leaves: the first device's
    shards against the full arrays (replicated leaves count whole on every device).  The shards
    are those of the placed leaves, or of ``shardings`` (a tree like ``state``) when given."""
    shardings = jax.tree.map(lambda x: x.sharding, state) if shardings is None else shardings
    per_device = total = 0
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        shape, itemsize = np.shape(x), itemsize_of(x)
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
        per_device += int(np.prod(s.shard_shape(shape), dtype=np.int64)) * itemsize
    return per_device, total


def itemsize_of(x) -> int:
    """Bytes per element (a typed PRNG key: of its key data)."""
    if is_prng_key(x):
        data = jax.random.key_data(x)
        return int(np.prod(data.shape[np.ndim(x):], dtype=np.int64)) * data.dtype.itemsize
    return np.dtype(x.dtype).itemsize


def process_slice(batch: dict) -> dict:
    """This process's contiguous slice of a *global* host batch (one every process holds whole,
    e.g. an evaluation batch); the batch itself in a one-process run."""
    p, n = jax.process_index(), jax.process_count()
    if n == 1:
        return batch
    size = len(next(iter(batch.values())))
    if size % n:
        raise ValueError(f"a global batch of {size} cannot be split over {n} processes")
    per = size // n
    return {k: v[p * per:(p + 1) * per] for k, v in batch.items()}


def select_devices(devices: int) -> list:
    """The first ``devices`` local devices of this process (0: all of them)."""
    local = jax.local_devices()
    if devices < 0 or devices > len(local):
        raise ValueError(
            f"parallel.devices={devices} but this process has {len(local)} local device(s) "
            f"({local[0].platform}); use 0 for all, or at most {len(local)}. On CPU, fake devices come from "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N or --local-devices N (scripts/train.py)")
    return local[:devices or len(local)]


def split_evenly(size: int, parts: int) -> None:
    """A local batch of ``size`` must split evenly over ``parts`` local devices."""
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
