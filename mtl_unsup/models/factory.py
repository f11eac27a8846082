"""The ``model`` config group: which LightningModule a run builds, and its config-set arguments.

``model._target_`` names the class (:class:`~mtl_unsup.models.module.MultiTaskModule`, or a
subclass of it); the group's other keys are its arguments that come from config (the answer head,
the seed, ...). What the data and the tasks decide (backbone, tasks, k, views, normalisation) the
builder passes when it calls the factory.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl_unsup.config import ConfigValueError

MODULE_TARGET = "mtl_unsup.models.module.MultiTaskModule"
# the arguments the builder passes, decided by the data, the tasks and the other groups
BUILT = ("backbone", "tasks", "num_clusters", "optimizer", "scheduler", "eval_splits", "augmentations",
         "mean", "std", "config", "auto_k", "feature_bank")


def model_spec(cfg: DictConfig) -> DictConfig:
    """``cfg.model``, or for a config written before the group existed (an older checkpoint's)
    the default class with the arguments read from the groups that set them then."""
    if cfg.get("model") is not None:
        return cfg.model
    cluster = cfg.get("cluster") or {}
    settings = {key: cluster[key] for key in ("pca_dim", "niter", "nredo") if key in cluster}
    return OmegaConf.create({"_target_": MODULE_TARGET, "_partial_": True,
                             "answer": str(cluster.get("answer", "auto")), "seed": int(cfg.get("seed", 0)),
                             "channels_last": bool(cfg.get("channels_last", False)),
                             **({"cluster_settings": settings} if settings else {})})


def named_arguments(cls: type) -> list[str]:
    """The arguments ``cls`` and the classes it passes ``**kwargs`` on to take by name."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names += [p.name for p in inspect.signature(klass.__init__).parameters.values()
                      if p.kind in named and p.name != "self" and p.name not in names]
    return names


def model_factory(cfg: DictConfig) -> Callable[..., Any]:
    """The class of ``model._target_`` with the group's arguments bound; a wrong class or an
    argument it does not take stops the run, naming ``model.<key>``."""
    spec = model_spec(cfg)
    try:
        factory = instantiate(spec, _partial_=True)
    except InstantiationException as err:
        why = str(err).splitlines()[0].split(", set env var HYDRA_FULL_ERROR")[0]
        raise ConfigValueError(f"model._target_={spec.get('_target_')!r} cannot be built: {why}. Name "
                               f"a LightningModule class, e.g. {MODULE_TARGET}.") from None
    if not isinstance(factory, functools.partial) or not isinstance(factory.func, type):
        raise ConfigValueError(f"model._target_={spec.get('_target_')!r} is not a class. Name a "
                               f"LightningModule class, e.g. {MODULE_TARGET}.")
    settable = [name for name in named_arguments(factory.func) if name not in BUILT]
    for key in factory.keywords:
        if key in BUILT:
            raise ConfigValueError(f"model.{key} is set when the model is built (from the data, the "
                                   "tasks and the other groups): drop it from the model group.")
        if key not in settable:
            raise ConfigValueError(f"model.{key} is not an argument of {spec._target_}; the model "
                                   f"group sets {', '.join(settable)}.")
    return factory
