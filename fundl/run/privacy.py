"""DP-SGD for a run whose config enables ``[privacy]`` (docs/privacy.md).

The rules between config keys that DP-SGD imposes (no ensembles, shuffled
data, no batch norm, no float16) were checked when the config was validated
(``fundl.run.config.check_config``); what needs the machine or the data is
checked here, before anything runs.
"""

from __future__ import annotations

import jax

from fundl.data import Dataset
from fundl.run.config import ConfigError


def dp_setup(config: dict, data: Dataset, placement=None):
    """The DP-SGD pieces a run of ``config`` needs (``fundl.transforms.DPTraining``: its Poisson
    loader, padded to a multiple of ``placement.num_devices``, its step and ε), or None when
    ``[privacy]`` is off."""
    p, t = config["privacy"], config["training"]
    if not p["enabled"]:
        return None
    from fundl.data.poisson import PoissonLoader
    from fundl.transforms.dp import DPTraining

    if config["parallel"]["mode"] in ("sharding", "fsdp") and placement is not None and placement.num_devices > 1:
        # XLA's SPMD partitioner gets per-example gradients of convolutions wrong on a batch sharded
        # on 'data' (docs/privacy.md); unsharded and pmap are exact.
        raise ConfigError(f"privacy.enabled with parallel.mode = '{config['parallel']['mode']}' on several devices: "
                          "XLA's SPMD partitioner computes wrong per-example gradients of convolutions here "
                          "(measured with jax 0.10.2; docs/privacy.md); use parallel.mode = 'pmap', which equals "
                          "one device")
    n = len(data.train["y"])
    if t["batch_size"] > n:
        raise ConfigError(f"privacy.enabled: training.batch_size = {t['batch_size']} is the expected Poisson "
                          f"batch size and must be <= the {n} training examples")
    loader = PoissonLoader(data.train, t["batch_size"], seed=t["seed"], prefetch=config["data"]["prefetch"],
                           multiple_of=placement.num_devices if placement is not None else 1,
                           process_index=jax.process_index(), process_count=jax.process_count())
    return DPTraining(loader, clip_norm=p["clip_norm"], noise_multiplier=p["noise_multiplier"], delta=p["delta"],
                      accountant=p["accountant"])
