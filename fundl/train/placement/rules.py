"""Partition rules: the ``PartitionSpec`` of each state leaf on a mesh.

One rule set covers every mode of the mesh path: data parallelism keeps
every leaf whole (replicated), FSDP splits leaves over ``data`` by the
automatic rule and by ``parallel.rules``, and an ensemble's member axis
(dimension 0 of every leaf) goes on ``members`` when the mesh has that axis.
"""

from __future__ import annotations

import re

import numpy as np
from jax.sharding import PartitionSpec as P

DATA, MODEL, MEMBERS = "data", "model", "members"  # the mesh axis names


class PartitionRules:
    """Each leaf's ``PartitionSpec`` from its tree path, shape and dtype.

    ``axes``: the mesh's ``{axis name: size}``.  ``rules``: ``[REGEX, [AXIS_OR_EMPTY, ...]]``
    pairs; the first whose regex matches the leaf's path (``re.search`` on e.g.
    ``params/layers/0/w`` or ``opt_state/0/mu/layers/0/w``: an unanchored pattern covers a
    parameter and its optimiser moments) gives the spec of the leaf's own dimensions.
    Otherwise, with ``split=True`` (fsdp), the automatic rule shards the largest dimension
    that divides evenly over ``data``; leaves smaller than ``min_size`` elements, integer
    leaves (step counters, PRNG key data) and leaves with no such dimension stay
    replicated.  ``members > 0``: leaves lead with an ensemble's member axis, never split
    by the automatic rule (rules describe a parameter's own dimensions).

    Examples:
        >>> rules = PartitionRules({"data": 4}, split=True, min_size=1024)
        >>> rules.spec("params/w", (256, 512), floating=True)
        P(None, 'data')
        >>> rules.spec("params/b", (512,), floating=True)        # below min_size: whole
        P()
    """

    def __init__(self, axes: dict[str, int], rules=(), *, split: bool = False, min_size: int = 1024,
                 members: int = 0):
        self.axes, self.split, self.min_size = dict(axes), split, min_size
        self.lead = (MEMBERS if MEMBERS in self.axes else None,) if members else ()
        self.rules = [self._check(i, rule) for i, rule in enumerate(rules)]

    def _check(self, i: int, rule):
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
        allowed = [a for a in (DATA, MODEL) if a in self.axes]
        for axis in spec:
            if axis not in ("", *allowed):
                raise ValueError(f"{where}: axis {axis!r} is not a mesh axis; expected one of {allowed} or '' "
                                 f"(not split), e.g. ['', 'model']" +
                                 (" (set parallel.model_devices > 1 for a 'model' axis)" if axis == MODEL else ""))
        return regex, tuple(a or None for a in spec), pattern

    def spec(self, path: str, shape: tuple, floating: bool) -> P:
        """The spec of the leaf at ``path`` (member axis included) of ``shape``; ``floating``:
        whether its dtype is a float (only those are split automatically)."""
        lead = self.lead
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
        n = self.axes[DATA]
        if not self.split or not floating or n == 1 or int(np.prod(own, dtype=np.int64)) < max(self.min_size, 1):
            return P(*lead)
        fits = [d for d in range(len(own)) if own[d] % n == 0]
        if not fits:
            return P(*lead)
        best = max(fits, key=lambda d: (own[d], -d))  # the largest; the first of equals
        return P(*lead, *([None] * best), DATA)
