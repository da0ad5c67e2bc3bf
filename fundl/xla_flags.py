"""XLA:CPU flags that measured faster for fundl's training steps, applied only on request.

XLA reads ``XLA_FLAGS`` once, when JAX initialises its backend, so
:func:`apply_recommended_xla_flags` must run before the first JAX
computation (scripts call it at start-up).  It never overrides a user's
choice: when ``XLA_FLAGS`` is already set (even to an empty string) it does
nothing.  Importing this module does not import JAX.

Measured on the 2-core AMD EPYC used for ``docs/benchmarks.md``:
see that page for the figures behind ``RECOMMENDED_CPU_FLAGS``.
"""

from __future__ import annotations

import os
import sys

RECOMMENDED_CPU_FLAGS: tuple[str, ...] = ()


def _backend_started() -> bool:
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # noqa: BLE001 - private API; assume not started
        return False


def apply_recommended_xla_flags(flags=RECOMMENDED_CPU_FLAGS) -> bool:
    """Set ``XLA_FLAGS`` to ``flags`` unless the user set it; True when applied.

    Returns False (and changes nothing) when ``XLA_FLAGS`` is set, when
    ``flags`` is empty, or when JAX's backend has already started (the
    flags would be ignored).
    """
    if "XLA_FLAGS" in os.environ or not flags or _backend_started():
        return False
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return True
