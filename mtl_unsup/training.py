"""The main job: compose the config, build data, model and callbacks, fit, test, write metrics.

Run ``python -m mtl_unsup.train`` (digits, the default) or, for instance,
``python -m mtl_unsup.train data=folder data.root=/path/to/images cluster.k=20``. The pieces are
built by :mod:`mtl_unsup.build` and the results written by :mod:`mtl_unsup.results`; a run with
``stages`` runs them in turn (:mod:`mtl_unsup.staged`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_unsup.build import (  # noqa: F401 (also found here by mtl_unsup.train)
    Run,
    build_callbacks,
    build_datamodule,
    build_model,
    build_run,
    build_tasks,
    build_trainer,
    check_selection,
    check_sizes,
)
from mtl_unsup.clustering.callback import PseudoLabelCallback
from mtl_unsup.config import check_config, register_configs
from mtl_unsup.console import lightning_prints_once
from mtl_unsup.data.images import DataError
from mtl_unsup.inference import load_checkpoint
from mtl_unsup.models.module import NonFiniteLossError
from mtl_unsup.planning.budget import begin_run
from mtl_unsup.results import (  # noqa: F401 (also found here by mtl_unsup.train)
    flatten_results,
    format_table,
    write_results,
    write_run_info,
)
from mtl_unsup.resume import resolve_start
from mtl_unsup.run_lock import run_dir_lock

log = logging.getLogger(__name__)
register_configs()
lightning_prints_once()


def adopt_checkpoint(ckpt_path: str, resuming: bool, run: Run, ckpt: dict | None = None) -> str | None:
    """Check a checkpoint against this run; returns what ``fit`` resumes from (None: nothing).
    ``ckpt``: the file's contents where the caller has read them already.

    Resuming continues the whole training state, and must be on the images the pseudo-labels
    belong to: on other images it stops, naming both folders. A new run from a checkpoint
    (``ckpt_path=`` without resuming) takes its weights only and starts at epoch 0, and may
    train other tasks than the checkpoint's; on other images it also drops the clustering, and
    clusters the new images afresh.
    """
    if ckpt is None:
        ckpt = load_checkpoint(ckpt_path, key="ckpt_path")  # not an mtl-unsup checkpoint: stop here
    state, datamodule = ckpt.get("cluster_state"), run.datamodule
    saved = (state or {}).get("fingerprint") or ""
    same = not state or (saved == datamodule.fingerprint if saved
                         else len(state["labels"]) == datamodule.num_train)
    if not same:
        data = (ckpt.get("mtl_config") or {}).get("data", {})
        then = data.get("root") or data.get("path", "?")
        what = (f"{ckpt_path} holds pseudo-labels of other training images ({then}: "
                f"{len(state['labels'])} images) than this run's ({datamodule.describe()}: "
                f"{datamodule.num_train} images, or another split of them)")
        if resuming:
            raise DataError(f"{what}. Resume with the data (data.root, split settings) the run "
                            "was started with, or start a new run from its weights with "
                            "ckpt_path=... (without resume=true), which clusters the new images "
                            "afresh.")
        rank_zero_only(log.warning)("%s: its weights are used, its clustering is not; the new "
                                    "images are clustered afresh.", what)
        run.module.ignore_checkpoint_clustering = True
    # another model stops here; a new run may add tasks or leave some out
    run.module.load_weights(ckpt, f"ckpt_path={ckpt_path!r}", other_tasks=not resuming)
    return ckpt_path if resuming else None


def finish_clustering(run: Run) -> None:
    """The final clustering, if ``fit`` did not get to it (a run resumed after its last epoch)."""
    state, trainer = run.module.cluster_state, run.trainer
    if state is None or state.epoch != trainer.current_epoch:
        callback = next(c for c in trainer.callbacks if isinstance(c, PseudoLabelCallback))
        callback.finish(trainer, run.module)


def start_run(cfg: DictConfig) -> tuple[str | None, Path]:
    """Check the config; the checkpoint to start from and the run directory (set in ``cfg``)."""
    check_config(cfg)
    ckpt_path, out_dir = resolve_start(cfg.ckpt_path, cfg.resume, Path(cfg.paths.output_dir))
    if out_dir != Path(cfg.paths.output_dir):
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    if cfg.print_config:
        rank_zero_only(print)(OmegaConf.to_yaml(cfg, resolve=True))
    return ckpt_path, out_dir


def fit_and_test(run: Run, ckpt_path: str | None, last_path: Path) -> dict[str, float]:
    """Fit (continuing ``ckpt_path``, if any), cluster the final features, save ``last_path``,
    test; returns the flat metrics."""
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLossError as err:
        last = last_path.parent / "last.ckpt"
        kept = (f"The last good checkpoint is {last}; continue from it with resume=true "
                "after lowering optimizer.lr or a task weight." if last.is_file()
                else "No checkpoint had been saved yet.")
        raise NonFiniteLossError(f"{err} {kept}") from None
    finish_clustering(run)
    # The final clustering goes into last.ckpt with the final weights. (weights_only=False is the
    # save side: keep optimizer and loop states too; every load uses weights_only=True.)
    trainer.save_checkpoint(last_path, weights_only=False)
    metrics = flatten_results(trainer.test(module, datamodule=datamodule, verbose=False))
    if module.auto_k:
        metrics["cluster/k"] = float(module.k)
    return metrics


def train(cfg: DictConfig, extra_callbacks: tuple[L.Callback, ...] = ()) -> dict[str, float]:
    """Fit and test one model; returns the final metrics (also written to ``metrics.json``).
    The run's stages (one without ``stages``) run in turn (:func:`mtl_unsup.staged.train_stages`). The run
    directory is locked from before it is looked at until the run ends (one writer per run)."""
    begin_run()  # trainer.max_time counts from here (from the process's start for mtl-train)
    with run_dir_lock(Path(cfg.paths.output_dir)):
        ckpt_path, out_dir = start_run(cfg)
        with run_dir_lock(out_dir):  # resume=true may continue another directory's run
            from mtl_unsup.staged import train_stages  # a run without stages is one stage

            return train_stages(cfg, ckpt_path, out_dir, extra_callbacks)


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimises: ``metrics[optimized_metric]`` (None when unset)."""
    return metrics[cfg.optimized_metric] if cfg.optimized_metric else None
