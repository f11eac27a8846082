"""A clean console: the messages third-party libraries print that tell our users nothing.

Each filter names one message and why it is dropped; nothing else is silenced, so a new warning
still shows.
"""

from __future__ import annotations

import logging
import warnings


class _DropTips(logging.Filter):
    """Lightning advertises its cloud products ("Tip: ... litlogger / litmodels") on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in str(record.msg)


def quiet_third_party() -> None:
    # Lightning's own internals call a torch pytree API that newer torch deprecates; nothing the
    # user (or we) can change, printed twice per run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Under DDP, Lightning warns that test loaders pad duplicates in; our evaluation gathers
    # every split by dataset index and drops them (mtl_unsup/models/evaluation.py).
    warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
    # A frozen backbone (backbone.freeze=true) stays in eval mode on purpose, BatchNorm included.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # torchmetrics builds NMI's contingency table as a sparse tensor without invariant checks.
    warnings.filterwarnings("ignore", message=r"Sparse invariant checks are implicitly disabled")
    # FAISS reports which CPU build it loaded, in eight INFO lines, once the run's logging is on.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def lightning_prints_once() -> None:
    """Lightning's messages, printed once and plain, as when it is imported before any logging
    is set up: then it gives ``lightning.pytorch`` and ``lightning.fabric`` a handler of their own
    and stops them there. Imported after Hydra has put its handlers on the root logger (the
    commands load Lightning only once the config is valid), it would send each message both to
    its own ``INFO:`` handler and to Hydra's."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
        logger.propagate = False
