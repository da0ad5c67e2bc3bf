"""How fundl lowers a convolution: one convolution forward, the weight gradient over the batch
in chunks on CPU.

XLA:CPU (jaxlib 0.10.2, whose convolutions are YNNPACK fusions) computes a large 2D
convolution's weight gradient faster as a sum over chunks of about 8 examples, each
convolved on its own, than as one contraction over the whole batch.  The forward convolution
and the input gradient gained nothing from chunks (a step with them chunked too ran slower),
and every chunk is one more convolution for XLA to compile, so only the weight gradient is
chunked: :func:`convolve` is a ``jax.custom_jvp``
whose primal is the whole convolution and whose tangent is ``conv(dx, w) + conv(x, dw)``
with the second term over interleaved batch chunks; ``grad`` transposes it into one input
gradient and one weight gradient per chunk.  Small 1D convolutions (MNIST-1D's) get slower
in chunks, and a long 1D one gained only with larger chunks, so 1D convolutions stay whole.
Measured per layer shape by ``benchmarks/bench_conv_chunks.py`` and per training step by
``benchmarks/bench_conv_compile.py``; the tables are in docs/benchmarks.md, "CNN" and
"First step".

The split is exact per example (only the weight gradient sums the chunks in another order,
~1e-7 relative); it composes with every transform (``jvp``, ``grad``, ``vmap``, higher
derivatives, ``pmap``, sharding: reshapes, slices and a stack), and
``lax.platform_dependent`` picks the chunked weight gradient only when the computation is
lowered for CPU, so GPU and TPU runs get the single convolution their libraries are tuned for.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

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
    """How many chunks to split a batch of ``batch`` examples into for the weight gradient on
    CPU, for a convolution with ``spatial_dims`` spatial axes whose whole output takes
    ``output_bytes``; 1 means no split.  The count divides the batch (every chunk the same
    size) and is at most :data:`MAX_CHUNKS`; among those it gives chunks closest to
    :data:`CPU_CHUNK_EXAMPLES`."""
    if (spatial_dims not in CPU_CHUNK_DIMS or batch <= CPU_CHUNK_EXAMPLES
            or output_bytes < CPU_CHUNK_MIN_OUTPUT_BYTES):
        return 1
    counts = [k for k in range(1, MAX_CHUNKS + 1) if batch % k == 0]
    return min(counts, key=lambda k: abs(batch // k - CPU_CHUNK_EXAMPLES))


def in_chunks(conv, x, w, chunks: int):
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
    bias if ``None``), whose weight gradient (the tangent in ``w``, and so its transpose) is
    computed over ``chunks`` interleaved pieces of the batch on CPU.

    ``chunks`` must divide the batch; ``None`` chooses by :func:`cpu_chunks`.  On other
    platforms, and with 1 chunk, the weight gradient is one convolution too.
    """
    def conv(a, b):
        return lax.conv_general_dilated(a, b, **conv_args)

    batch = x.shape[0]
    if chunks is None:
        out = jax.eval_shape(conv, x, w)  # only the output's size is needed
        chunks = cpu_chunks(batch, math.prod(out.shape) * out.dtype.itemsize, x.ndim - 2)
    if chunks <= 1:
        y = conv(x, w)
        return y if bias is None else y + bias
    if batch % chunks:
        raise ValueError(f"convolve: chunks={chunks} does not divide the batch of {batch}")

    def chunked(a, d):
        return in_chunks(conv, a, d, chunks)

    @jax.custom_jvp
    def f(x, w, *b):
        y = conv(x, w)
        return y + b[0] if b else y

    def f_jvp(primals, tangents):
        x, w, *b = primals
        dx, dw, *db = tangents
        y = f(x, w, *b)  # the whole convolution; through f, so that derivatives of the rule use it too
        terms = []
        if not isinstance(dx, SymbolicZero):
            terms.append(conv(dx, w))  # transposes into one input gradient
        if not isinstance(dw, SymbolicZero):  # transposes into one weight gradient per chunk
            terms.append(lax.platform_dependent(x, dw, cpu=chunked, default=conv))
        if db and not isinstance(db[0], SymbolicZero):
            terms.append(jnp.broadcast_to(db[0], y.shape).astype(y.dtype))
        return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)

    f.defjvp(f_jvp, symbolic_zeros=True)
    return f(x, w) if bias is None else f(x, w, bias)
