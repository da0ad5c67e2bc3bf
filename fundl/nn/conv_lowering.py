"""How fundl lowers a convolution: over the batch in chunks on CPU, whole elsewhere.

XLA:CPU (jaxlib 0.10.2, whose convolutions are YNNPACK fusions) runs a large
2D convolution's forward and backward faster when the batch is split into
chunks of 8 examples, each convolved on its own, than as one convolution,
mostly from the weight gradient.  Small 1D convolutions (MNIST-1D's) get
slower in chunks, and a long 1D one gained only with larger chunks, so 1D
convolutions stay whole.  Measured per layer shape by
``benchmarks/bench_conv_chunks.py``; the table is in docs/benchmarks.md, "CNN".

The split is exact per example (only the weight gradient sums the chunks in
another order, ~1e-7 relative); it composes with every transform (``grad``,
``jvp``, ``vmap``, ``pmap``, sharding: reshapes, slices and a stack), and
``lax.platform_dependent`` picks the chunked form only when the computation is
lowered for CPU, so GPU and TPU runs get the single convolution their
libraries are tuned for.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

CPU_CHUNK_EXAMPLES = 8
"""Examples per chunk on CPU: the fastest or within noise of it for every 2D layer shape measured."""

CPU_CHUNK_MIN_OUTPUT_BYTES = 2**20
"""Chunk only convolutions whose whole output is at least this large (1 MiB): every measured
2D layer above it gained (docs/benchmarks.md, "CNN").  Below it, untested: left whole."""

CPU_CHUNK_DIMS = (2,)
"""Spatial ranks that are chunked: 2D only (1D measured slower or mixed, above)."""

MAX_CHUNKS = 16
"""At most this many chunks (a larger batch gets larger chunks): each chunk is a separate
convolution in the compiled program, so the count bounds compile time."""


def cpu_chunks(batch: int, output_bytes: int, spatial_dims: int = 2) -> int:
    """How many chunks to split a batch of ``batch`` examples into on CPU, for a convolution
    with ``spatial_dims`` spatial axes whose whole output takes ``output_bytes``; 1 means no
    split.  The count divides the batch (every chunk the same size) and is at most
    :data:`MAX_CHUNKS`; among those it gives chunks closest to :data:`CPU_CHUNK_EXAMPLES`."""
    if (spatial_dims not in CPU_CHUNK_DIMS or batch <= CPU_CHUNK_EXAMPLES
            or output_bytes < CPU_CHUNK_MIN_OUTPUT_BYTES):
        return 1
    counts = [k for k in range(1, MAX_CHUNKS + 1) if batch % k == 0]
    return min(counts, key=lambda k: abs(batch // k - CPU_CHUNK_EXAMPLES))


def _in_chunks(conv, x, w, chunks: int):
    """``conv(x, w)`` computed on ``chunks`` interleaved slices of the batch (chunk ``i`` holds
    examples ``i, i + chunks, ...``) and put back in order.  Interleaved, not consecutive, so
    that a batch split over devices in blocks (``NamedSharding``) splits every chunk evenly."""
    batch = x.shape[0]
    grouped = x.reshape((batch // chunks, chunks) + x.shape[1:])
    parts = [conv(grouped[:, i], w) for i in range(chunks)]
    out = jnp.stack(parts, axis=1)
    return out.reshape((batch,) + out.shape[2:])


def convolve(x, w, bias=None, *, chunks: int | None = None, **conv_args):
    """``lax.conv_general_dilated(x, w, **conv_args) + bias`` with the batch as axis 0 (no
    bias if ``None``; added to each chunk, where XLA:CPU fuses it into the convolution).

    ``chunks``: how many pieces the batch is split into on CPU (it must divide the batch);
    ``None`` chooses by :func:`cpu_chunks`.  On other platforms the convolution is one call.
    """
    def conv(a, b):
        y = lax.conv_general_dilated(a, b, **conv_args)
        return y if bias is None else y + bias

    batch = x.shape[0]
    if chunks is None:
        out = jax.eval_shape(conv, x, w)  # only the output's size is needed
        chunks = cpu_chunks(batch, math.prod(out.shape) * out.dtype.itemsize, x.ndim - 2)
    if chunks <= 1:
        return conv(x, w)
    if batch % chunks:
        raise ValueError(f"convolve: chunks={chunks} does not divide the batch of {batch}")
    return lax.platform_dependent(
        x, w, cpu=lambda a, b: _in_chunks(conv, a, b, chunks), default=conv)
