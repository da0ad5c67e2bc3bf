"""The placement contract: what ``fit``, ``evaluate`` and the run layer ask of a placement.

Two classes implement it, structurally (neither inherits from it):
:class:`~fundl.train.placement.mesh.MeshPlacement` (``jax.jit`` with a
``NamedSharding`` per state leaf: one device, data parallelism, FSDP,
ensembles) and :class:`~fundl.train.placement.pmap.PmapPlacement`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol


class EvalView(NamedTuple):
    """The part of a placement ``fundl.train.loop.evaluate`` uses, for *global* batches (every
    process holds all of each evaluation batch and keeps its own slice)."""

    num_devices: int
    put_batch: Callable[..., Any]      # put_batch(batch, stacked=False) -> what the eval step takes
    host_metrics: Callable[[Any], Any]  # as Placement.host_metrics


class Placement(Protocol):
    """Where a training step runs: compiles pure steps, moves states, batches and metrics.

    A *plain* state is an ordinary train state (host or single-device arrays);
    a *placed* state is the one the compiled step takes and returns.
    """

    num_devices: int
    """Devices of the run, all processes together."""

    data_devices: int
    """Devices a batch is split over (fewer than ``num_devices`` when the mesh has a member or model axis)."""

    axis_name: str | None
    """The axis a step must average over (``pmap``'s ``"batch"``); None where XLA inserts the reductions."""

    sync_every: int
    """Dispatches between forced host syncs (0: only when logging); ``compile_train`` may lower it."""

    splits_state: bool
    """True when state leaves are split over devices (fsdp); the layout is then worth reporting."""

    def compile_train(self, step: Callable, steps_per_call: int = 1, unroll: bool | int | str = 1) -> Callable:
        """``fn(state, batch) -> (state, metrics)`` with the state donated; ``steps_per_call = K > 1``
        fuses K steps (batch leaves lead with K, metrics come back stacked (K, ...))."""
        ...

    def compile_eval(self, eval_step: Callable) -> Callable:
        """``fn(params, model_state, batch) -> sums`` from a ``make_eval_step`` step."""
        ...

    def put_state(self, state) -> Any:
        """A placed copy of a plain or placed state (the donating step never deletes the caller's arrays)."""
        ...

    def get_state(self, state) -> Any:
        """One plain copy of a placed state (every process calls it together in a multi-process run)."""
        ...

    def put_batch(self, batch: dict, stacked: bool = False) -> Any:
        """This process's host batch (NumPy; ``stacked``: K fused batches) as the train step takes it."""
        ...

    def host_metrics(self, metrics) -> Any:
        """Step outputs (a tree of arrays) as NumPy, read from one addressable copy."""
        ...

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ValueError, before training, if the global batch cannot split evenly over the devices."""
        ...

    def eval_params(self, state) -> tuple[Any, Any]:
        """``(params, model_state)`` as ``compile_eval``'s function takes them: placed leaves as
        they are (no copy), plain leaves placed from the host."""
        ...

    def for_eval(self) -> EvalView:
        """The view ``evaluate`` takes: it hands out global batches."""
        ...

    def saveable(self, state) -> Any:
        """The placed state as global arrays every process passes to a checkpoint save."""
        ...

    def restore_target(self, template) -> Any:
        """``ShapeDtypeStruct`` leaves with the sharding to restore ``saveable(template)`` onto."""
        ...
