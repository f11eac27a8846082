"""The ``logger`` and ``callbacks`` config groups: Lightning loggers and callbacks from config.

Each option sits under its own name (``logger.csv``, ``callbacks.early_stopping``), so options
combine: ``logger=[csv,tensorboard]``, ``callbacks=[lr_monitor,rich_progress_bar]``. Callbacks
are appended to the built-in ones (pseudo-labels, checkpoints, the epoch history). A logger or
callback whose package is missing stops the run before any data is read, naming the extra.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mtl_unsup.config import ConfigValueError

# class name -> (modules it needs, the extra that installs them); MLflow's SQLite store (the
# default tracking_uri) needs SQLAlchemy and Alembic, which mlflow-skinny leaves out
NEEDS = {
    "TensorBoardLogger": (("tensorboard",), "tensorboard"),
    "WandbLogger": (("wandb",), "wandb"),
    "MLFlowLogger": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),
    "RichProgressBar": (("rich",), "rich"),
    "RichModelSummary": (("rich",), "rich"),
}


def _entries(group: DictConfig | None, key: str) -> dict[str, DictConfig]:
    """The group's options by name (a bare ``_target_`` mapping counts as one, named ``key``)."""
    if not group:
        return {}
    if "_target_" in group:
        return {key: group}
    for name, entry in group.items():
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigValueError(f"{key}.{name} is not a {key} option (no _target_): choose options "
                                   f"of conf/{key}/, e.g. {key}=[...], or remove it with ~{key}.{name}.")
    return dict(group.items())


def check_extensions(cfg: DictConfig) -> None:
    """Every logger's and callback's package is installed, and the callbacks fit the rest of the
    config (checked before any data is read)."""
    from importlib.util import find_spec

    callbacks = _entries(cfg.get("callbacks"), "callbacks")
    if "lr_monitor" in callbacks and not cfg.get("logger"):
        raise ConfigValueError("callbacks.lr_monitor writes to a logger, and logger is off: add one "
                               "(logger=csv) or drop lr_monitor (train/lr is logged anyway).")
    stopping = callbacks.get("early_stopping")
    if stopping is not None and "loss" in str(stopping.get("monitor")) and stopping.get("mode") == "max":
        raise ConfigValueError(f"callbacks.early_stopping.monitor={stopping.monitor} falls as training "
                               "improves: add callbacks.early_stopping.mode=min.")
    if "rich_progress_bar" in callbacks and cfg.trainer.get("enable_progress_bar") is False:
        raise ConfigValueError("callbacks.rich_progress_bar is a progress bar, and "
                               "trainer.enable_progress_bar=false: drop one of them.")
    for key in ("logger", "callbacks"):
        for name, entry in _entries(cfg.get(key), key).items():
            modules, extra = NEEDS.get(str(entry._target_).rsplit(".", 1)[-1], ((), None))
            for module in modules:
                if find_spec(module) is None:
                    raise ConfigValueError(f"{key}.{name} needs the {module} package: pip install "
                                           f"'mtl-unsup[{extra}]' (or drop it from {key}=[...]).")


def build_loggers(cfg: DictConfig) -> list[Any] | bool:
    """The configured loggers (False: none)."""
    from hydra.utils import instantiate

    loggers = [instantiate(entry) for entry in _entries(cfg.get("logger"), "logger").values()]
    return loggers or False


def build_extra_callbacks(cfg: DictConfig) -> list[Any]:
    """The ``callbacks`` group's callbacks, in the order composed."""
    from hydra.utils import instantiate

    return [instantiate(entry) for entry in _entries(cfg.get("callbacks"), "callbacks").values()]


def finish_loggers(trainer: Any) -> None:
    """Close a W&B run: the next run of the same process (a sweep's next job) starts its own
    instead of logging into this one."""
    if trainer.is_global_zero and any(type(logger).__name__ == "WandbLogger" for logger in trainer.loggers):
        import wandb

        wandb.finish()
