"""``mtl-train`` (``python -m mtl_unsup.train``): the main job, composed from conf/train.yaml.

This module stays light so that ``--help``, a misspelt key and a value out of range are answered
before torch, Lightning or FAISS load (in about a second); the job itself is
:mod:`mtl_unsup.training`, whose names (``train``, ``build_run``, ...) are also found here.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mtl_unsup.cli import hydra_command
from mtl_unsup.config import check_config, register_configs

register_configs()  # the schemas, before Hydra composes


@hydra_command("train")  # a user's mistake: one message, exit status 2
def main(cfg: DictConfig) -> float | None:
    """Train; return ``optimized_metric`` (label-free by default) for a Hydra sweeper."""
    check_config(cfg)  # before the heavy imports
    check_overrides(cfg)
    from mtl_unsup.planning.budget import mark_command_start

    if not in_sweep():  # a sweep's later jobs share the process: their runs start at train()
        mark_command_start()
    from mtl_unsup.errors import NonFiniteLossError
    from mtl_unsup.training import objective, train

    try:
        return objective(cfg, train(cfg))
    except NonFiniteLossError as err:
        if not in_sweep():
            raise
        print(f"error: {err} This trial scores NaN; the sweep goes on.")
        return float("nan")


def check_overrides(cfg: DictConfig) -> None:
    """Refuse command-line (or sweep) overrides that the run's stages replace (they would be
    silently ignored) and a protocol named beside an experiment (they would be merged)."""
    from hydra.core.hydra_config import HydraConfig

    from mtl_unsup.config import ConfigValueError
    from mtl_unsup.stage_checks import mixed_protocol, replaced_overrides

    if HydraConfig.initialized():
        given = list(HydraConfig.get().overrides.task)
        mixed = mixed_protocol(given, HydraConfig.get().runtime.choices.get("experiment"))
        problems = [mixed] if mixed else replaced_overrides(cfg, given)
        if problems:
            raise ConfigValueError("Invalid configuration:\n  " + "\n  ".join(problems))


def in_sweep() -> bool:
    """Whether this run is one job of a ``-m`` sweep (Hydra's multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # probes such as __path__ must not load the job
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mtl_unsup import training

    try:
        return getattr(training, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":
    main()
