"""fundl.transforms: JAX transforms of fundl models and training steps, as features.

- Per-example gradients (``vmap(grad)``) and DP-SGD: :func:`per_example_grads`,
  :func:`global_norms` (each example's gradient norm), :func:`make_dp_train_step`,
  :func:`epsilon` (docs/privacy.md).
- Gradients through training: :func:`unrolled_training`, :func:`with_learning_rate`,
  :func:`scale_params`, :func:`make_weighted_train_step` (docs/transforms.md).
- LoRA: :mod:`fundl.transforms.lora` (``lora.adapt``, ``lora.init``, ``lora.merge``): low-rank
  adapters on chosen parameters, the only ones that train.
"""

from fundl.transforms import lora

from fundl.transforms.dp import DPTraining, clip_and_sum, epsilon, make_dp_train_step, privatize
from fundl.transforms.per_example import ExampleCouplingError, global_norms, model_loss, per_example_grads
from fundl.transforms.through_training import (
    make_weighted_train_step, scale_params, unrolled_training, with_hyperparams, with_learning_rate,
)

__all__ = [
    "DPTraining", "ExampleCouplingError", "clip_and_sum", "epsilon", "global_norms", "make_dp_train_step", "model_loss",
    "per_example_grads", "privatize", "make_weighted_train_step", "scale_params", "unrolled_training",
    "with_hyperparams", "with_learning_rate", "lora",
]
