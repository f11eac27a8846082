"""The LightningModule: a shared backbone, several task heads, one weighted loss."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

import mtl_unsup
from mtl_unsup.clustering.bank import FeatureBank
from mtl_unsup.clustering.kmeans import ClusterState, cluster_features
from mtl_unsup.clustering.targets import Targets, is_provider
from mtl_unsup.config import ConfigValueError
from mtl_unsup.errors import CheckpointError, NonFiniteLossError
from mtl_unsup.models.evaluation import SplitRecorder, score_split
from mtl_unsup.rng import collect_rng_states, set_rng_states
from mtl_unsup.tasks.base import Task, TaskBatch, latest_stage

log = logging.getLogger(__name__)


class PlainView(nn.Module):
    """The ``plain`` view: the image as it is (cached feature rows: their plain slot). SCAN's
    self-labels come from it; a ``plain`` entry of ``data.augmentations`` replaces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if x.ndim == 3 else x


class MultiTaskModule(L.LightningModule):
    """Trains a backbone jointly on several tasks and evaluates its clusters.

    Args:
        backbone: module with a ``feature_dim`` attribute.
        tasks: name -> :class:`Task`; each gets a head sized for the backbone.
        num_clusters: k, the size of the clustering head and of k-means.
        optimizer: partial optimizer taking the parameters (None for inference only).
        scheduler: optional partial LR scheduler taking the optimizer (stepped every epoch).
        eval_splits: names of the test dataloaders, in order.
        augmentations: name -> batched augmentation module; tasks ask for views by name
            (``plain``, the image as it is, is always there).
        mean, std: per-channel normalisation applied after augmentation (and to plain images).
        config: the composed run config, stored in checkpoints for later tools.
        seed: the run's seed; with the rank, epoch and batch it seeds each training step.
        cluster_settings: ``pca_dim``, ``niter`` and ``nredo`` of the clustering, used to score
            validation with k-means fitted on the current validation features.
        answer: the clustering head whose clusters are the run's answer (see :meth:`answer`):
            ``auto`` or a head's name.
        auto_k: ``cluster.k=auto``: ``num_clusters`` is the largest k tried, and the run's k
            (:attr:`k`) is the one the last refresh chose.
        feature_bank: the training set's size, to keep a :class:`FeatureBank` of the training
            pass's features (``cluster.features=bank``; not with fixed features); 0 for none.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Mapping[str, Task],
        num_clusters: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., Any] | None = None,
        eval_splits: tuple[str, ...] = ("test",),
        augmentations: Mapping[str, nn.Module] | None = None,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        config: dict | None = None,
        seed: int = 0,
        cluster_settings: Mapping[str, Any] | None = None,
        answer: str = "auto",
        auto_k: bool = False,
        channels_last: bool = False,
        feature_bank: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("The task list is empty: compose at least one task, e.g. task=[cluster].")
        # Channels-last convolutions: faster with oneDNN on CPUs and with AMP on tensor cores.
        self.channels_last = channels_last
        self.backbone = backbone.to(memory_format=torch.channels_last) if channels_last else backbone
        self.tasks = nn.ModuleDict(dict(tasks))
        self.augmentations = nn.ModuleDict({"plain": PlainView(), **dict(augmentations or {})})
        # The stage being trained (see enter_stage): its index seeds its steps apart from the
        # other stages'; its task weights replace the tasks' own (None: every task at its own).
        self.stage_index, self.stage_weights, self.backbone_lr = 0, None, 1.0
        self.refresh_policy = "every"  # a stage's: once / never keep a k-means the backbone outgrows
        self._stage_frozen = False  # the backbone frozen by a stage (backbone_lr=0), not by config
        self.view_counts = self._view_counts()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        for name, task in self.tasks.items():
            if task.refreshes and not is_provider(task):
                raise ConfigValueError(f"task.{name} ({type(task).__name__}) makes dataset-level targets "
                                       "(refreshes=True) but is no TargetProvider: subclass "
                                       "mtl_unsup.clustering.targets.TargetProvider too.")
            task.build(backbone.feature_dim, num_clusters)
        for name, task in self.tasks.items():
            try:
                task.bind(self.tasks)
            except ValueError as err:
                raise ConfigValueError(f"task.{name}: {err}") from None
        self.num_clusters, self.auto_k = num_clusters, auto_k
        self.targets = Targets()  # every dataset-level target, saved with the model
        self.heads = self._head_table()
        self.answer_setting = answer
        choices = [n for n, (t, _, k) in self.heads.items() if k == num_clusters and self.tasks[t].weight > 0]
        if answer not in ("auto", "kmeans") and answer not in choices:
            raise ConfigValueError(f"cluster.answer={answer!r} is not a clustering head with cluster.k="
                                   f"{num_clusters} clusters; choose auto, kmeans or one of {choices}")
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.eval_splits = tuple(eval_splits)
        self.config = config or {}
        self.seed = int(seed)
        self.cluster_settings = dict(cluster_settings or {"pca_dim": 32, "niter": 20, "nredo": 5})
        self.recorders = {s: SplitRecorder(backbone.feature_dim) for s in ("val", *self.eval_splits)}
        # cluster.features=bank: the training pass's features of each image, for refreshes (none
        # for fixed features: they are clustered once, so a bank would only cost memory and steps)
        self.feature_bank = (FeatureBank(feature_bank, backbone.feature_dim)
                             if feature_bank and not self.features_fixed else None)
        # the training images' outputs of the last test pass (the answer's candidates) and, once
        # the answer is chosen among them, the sentence that says how (answer/choice.py)
        self.train_outputs: dict[str, torch.Tensor] | None = None
        self.chosen_by: str | None = None
        # A checkpoint whose clustering belongs to other images (``ckpt_path=`` on a new folder):
        # its weights are used, its pseudo-labels are not.
        self.ignore_checkpoint_clustering = False

    @property
    def features_fixed(self) -> bool:
        """Whether the backbone's features never change (frozen, or rows given as they are)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    # ------------------------------------------------------------------------- stages
    def task_weight(self, name: str) -> float:
        """The weight of task ``name`` in the stage being trained (0: it does not train)."""
        weights = self.stage_weights
        return self.tasks[name].weight if weights is None else weights.get(name, 0.0)

    def task_active(self, name: str, epoch: int) -> bool:
        return self.task_weight(name) > 0 and self.tasks[name].active(epoch)

    def enter_stage(self, index: int, weights: Mapping[str, float],
                    settings: Mapping[str, Mapping[str, Any]], optimizer: Callable[..., Any],
                    scheduler: Callable[..., Any] | None, backbone_lr: float = 1.0,
                    refresh: str = "every") -> None:
        """Train as stage ``index`` from now on: only the tasks in ``weights``, at those weights,
        with ``settings`` (view, start epoch, ...; checked by the caller) set on them, under their
        own optimiser and scheduler; the backbone at ``backbone_lr`` times the learning rate (0:
        frozen); ``refresh``: the stage's policy for its targets (see ``PseudoLabelCallback``)."""
        for name, values in settings.items():
            for key, value in values.items():
                setattr(self.tasks[name], key, int(value) if key == "start_epoch" else value)
        self.stage_index, self.stage_weights = index, dict(weights)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.backbone_lr, self.refresh_policy = float(backbone_lr), refresh
        if not getattr(self.backbone, "frozen", False) or self._stage_frozen:
            self._stage_frozen = self.backbone_lr == 0  # frozen for this stage only
            self.backbone.frozen = self._stage_frozen
            self.backbone.requires_grad_(not self._stage_frozen)
        self.view_counts = self._view_counts()
        self._rng_to_restore = None  # a resumed stage's checkpoint sets them again
        self.targets.last_refresh = None  # the epochs count from 0 again
        if self.feature_bank is not None:  # the previous stage's features describe another model
            self.feature_bank.clear()

    def _view_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, task in self.tasks.items():
            if self.task_weight(name) == 0:  # never active: its views would be augmented for nothing
                continue
            for view, n in task.views().items():
                if view not in self.augmentations:
                    raise ConfigValueError(
                        f"task.{name} reads the view {view!r}, which is not in data.augmentations "
                        f"({sorted(self.augmentations)}). Add it there or pick one of those."
                    )
                counts[view] = max(counts.get(view, 0), n)
        return counts

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:  # cached feature rows (a frozen backbone): nothing to normalise
            return x
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def encode(self, view: torch.Tensor) -> torch.Tensor:
        """Backbone features of a normalised view; a view of cached features is already that."""
        return view if view.ndim == 2 else self.backbone(view)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of plain [0, 1] images (normalised here), or the plain slot of
        cached feature rows (``(B, slots, D)``, see :mod:`mtl_unsup.data.embeddings`)."""
        if images.ndim == 3:
            return images[:, 0]
        return self.encode(self.normalize(images))

    @torch.no_grad()
    def make_views(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Independently augmented, normalised copies of the batch, as many as the tasks need."""
        return {
            name: [self.normalize(self.augmentations[name](images)) for _ in range(count)]
            for name, count in self.view_counts.items()
        }

    # ------------------------------------------------------------------------- clustering
    @staticmethod
    def head_name(task: str, sub: str) -> str:
        """A head's full name: the task's (one head) or ``<task>_<head>`` (SCAN's ``scan_h3``)."""
        return f"{task}_{sub}" if sub else task

    def _head_table(self) -> dict[str, tuple[str, str, int]]:
        """Full head name -> (task name, the task's name for it, number of clusters as built)."""
        return {self.head_name(name, sub): (name, sub, k) for name, task in self.tasks.items()
                for sub, k in task.cluster_heads().items()}

    @property
    def k(self) -> int:
        """The run's number of clusters: ``cluster.k``, or with ``cluster.k=auto`` the one the
        last refresh chose (the largest k tried before any)."""
        if self.auto_k and self.cluster_state is not None:
            return self.cluster_state.k
        return self.num_clusters

    def head_sizes(self) -> dict[str, int]:
        """Full head name -> its current number of clusters."""
        return {self.head_name(name, sub): k for name, task in self.tasks.items()
                for sub, k in task.cluster_heads().items()}

    def answer(self) -> str | None:
        """The clustering head that is the run's answer, chosen without labels (None: k-means').

        ``cluster.answer`` names one; ``auto`` takes, among the trained tasks with a head of
        ``cluster.k`` clusters, the one of the latest stage of the field's pipeline (neighbour
        consistency refines k-means targets), then the latest start epoch, then the first in the
        task list, and that task's own choice among its heads (SCAN: the lowest loss).
        """
        if self.answer_setting == "kmeans":
            return None
        if self.answer_setting != "auto":
            return self.answer_setting

        def fits(_: str, task: Task) -> bool:
            sub = task.answer_head()
            return (task.weight > 0 and sub is not None and task.answer_ready()
                    and task.cluster_heads()[sub] == self.k)

        name = latest_stage(self.tasks, fits)
        return None if name is None else self.head_name(name, self.tasks[name].answer_head())

    def explain_answer(self) -> str:
        """A sentence: which head answers, and why (for the report)."""
        answer = self.answer()
        if self.chosen_by:
            return self.chosen_by
        if answer is None and self.answer_setting == "kmeans":
            return "The answer is k-means of the features, named by cluster.answer."
        if answer is None:
            return ("The answer is k-means of the features: no clustering head with cluster.k clusters "
                    "trained and held up.")
        if self.answer_setting != "auto":
            return f"The answer is the {answer} head, named by cluster.answer."
        if len(self.heads) == 1:
            return f"The answer is the {answer} head, the run's only clustering head."
        return (f"The answer is the {answer} head, chosen without labels among {len(self.heads)} clustering "
                "heads: of the trained heads with cluster.k clusters, the latest stage of the pipeline "
                "(neighbours after k-means targets), then the latest start, then the head's own lowest "
                "running loss.")

    def head_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every clustering head, by full head name."""
        return {self.head_name(name, sub): logits for name, task in self.tasks.items()
                for sub, logits in task.head_logits(features).items()}

    @property
    def cluster_state(self) -> ClusterState | None:
        """The k-means of the training features at ``cluster.k`` (held by :attr:`targets`):
        evaluation and prediction assign new images to its centroids."""
        return self.targets.kmeans

    @cluster_state.setter
    def cluster_state(self, state: ClusterState | None) -> None:
        self.targets.kmeans = state

    @property
    def k_selection(self) -> dict[int, float]:
        """``cluster.k=auto``: the criterion of each k tried (held by :attr:`targets`)."""
        return self.targets.k_selection

    @k_selection.setter
    def k_selection(self, scores: dict[int, float]) -> None:
        self.targets.k_selection = dict(scores)

    def adopt_task_states(self, states: Mapping[str, Any], reset_head: bool = True,
                          head_init: str | None = None) -> None:
        """Make ``states`` the named tasks' targets; restarted heads lose their optimizer moments."""
        for name, state in states.items():
            restarted = self.targets.put(name, self.tasks[name], state, reset_head, head_init)
            if restarted and self._trainer is not None:
                for optimizer in self.trainer.optimizers:
                    for p in restarted:
                        optimizer.state.pop(p, None)

    # ------------------------------------------------------------------------- training
    @torch.no_grad()
    def fetch_views(self, view: str, indices: torch.Tensor) -> torch.Tensor:
        """Augmented, normalised ``view`` of the training images at ``indices`` (e.g. the batch's
        neighbours), read through the data module by dataset index."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "train_images"):
            raise RuntimeError("This task reads training images by index: fit with a data module "
                               "that has train_images() (ImageFolderDataModule).")
        images = datamodule.train_images(indices.cpu()).to(self.device)
        return self.normalize(self.augmentations[view](images))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def step_seed(self, batch_idx: int) -> int:
        """Seed of one training step: distinct per rank, reproducible from the run's seed."""
        key = [self.seed, self.global_rank, self.current_epoch, batch_idx]
        if self.stage_index:  # a later stage draws apart from the first (whose epochs it repeats)
            key.append(self.stage_index)
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    def on_train_epoch_start(self) -> None:
        if self.trainer.optimizers:  # the first parameter group's learning rate, for every logger
            lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            self.log("train/lr", lr, on_step=False, on_epoch=True, batch_size=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        active = {n: t for n, t in self.tasks.items() if self.task_active(n, self.current_epoch)}
        if not active:  # e.g. only a cluster task still in its warm-up: nothing to learn yet
            return None
        # Augmentations and random tasks draw from the global RNG: each rank draws its own
        # crops, and a step's draws depend on nothing but (seed, rank, epoch, batch), which also
        # makes a resumed run draw what the interrupted one would have.
        torch.manual_seed(self.step_seed(batch_idx))
        # Only views and indices go to the tasks: ground-truth labels never reach a loss.
        task_batch = TaskBatch(self.make_views(batch["image"]), batch["index"], self.encode,
                               fetch=self.fetch_views)
        total = torch.zeros((), device=self.device)
        bs = len(batch["index"])
        losses: dict[str, torch.Tensor] = {}
        for name, task in active.items():
            loss = task.loss(task_batch)
            losses[name] = loss.detach()
            self.log(f"train/loss_{name}", loss, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
            for key, value in task.step_metrics().items():
                self.log(f"train/{name}_{key}", value, on_step=False, on_epoch=True, batch_size=bs,
                         sync_dist=True)
            total = total + self.task_weight(name) * loss
        if not torch.isfinite(total):  # one device sync a step: stop before a bad update
            raise NonFiniteLossError(
                f"The training loss became {total.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step} ({', '.join(f'{n}={float(v):.4g}' for n, v in losses.items())}). "
                "Training stopped before this step changed the weights."
            )
        self.log("train/loss", total, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs,
                 sync_dist=True)
        computed = task_batch.computed_features()
        if self.feature_bank is not None and computed is not None:
            self.feature_bank.remember(batch["index"], computed, self.global_step)
        return total

    def configure_optimizers(self) -> Any:
        # a frozen backbone's parameters get no optimizer state (nor weight decay)
        optimizer = self.optimizer_factory(params=self._param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _param_groups(self) -> list[Any]:
        """The trainable parameters; with a stage's ``backbone_lr`` the backbone's in a group of
        their own at that share of the learning rate."""
        backbone = {id(p) for p in self.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone]
        trained = [p for p in self.backbone.parameters() if p.requires_grad]
        if self.backbone_lr == 1.0 or not trained:
            return [p for p in self.parameters() if p.requires_grad]
        lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if lr is None:
            raise ConfigValueError("stages: backbone_lr needs the stage's optimizer to set lr.")
        return [{"params": trained, "lr": lr * self.backbone_lr}, {"params": rest}]

    # ------------------------------------------------------------------------- evaluation
    def predict_clusters(self, x: torch.Tensor, kmeans: bool = True) -> dict[str, Any]:
        """Backbone features, every clustering head's logits (``heads``), the answer's
        (``logits``, if a head is the answer) and the k-means assignment (if fitted and asked for)."""
        features = self.features(x)
        out: dict[str, Any] = {"features": features, "heads": self.head_logits(features)}
        answer = self.answer()
        if answer is not None:
            out["logits"] = out["heads"][answer]
        if kmeans and self.cluster_state is not None:
            out["kmeans"], out["distance"] = self.cluster_state.assign(features)
        return out

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        out = self.predict_clusters(batch["image"], kmeans=self._kmeans_from_state())
        record = {"index": batch["index"], "label": batch["label"], "features": out["features"].float()}
        if "logits" in out:
            record["head"] = out["logits"].argmax(1)
        if self._records_heads():
            record.update({f"heads/{n}": logits.argmax(1) for n, logits in out["heads"].items()})
        if "kmeans" in out:
            record["kmeans"] = out["kmeans"].to(self.device)
        self.recorders[split].add(**record)

    def _eval_epoch_end(self, split: str) -> None:
        keys = ("index", "label", "features")
        if self.answer() is not None:
            keys += ("head",)
        if self._records_heads():
            keys += tuple(f"heads/{n}" for n in self.heads)
        if self._kmeans_from_state():
            keys += ("kmeans",)
        out = self.recorders[split].collect(self, keys)  # a collective: every rank enters it
        if self.trainer.testing and split == "train":  # the answer's candidates (answer/candidates.py)
            self.train_outputs = out
        scores = None
        if self.trainer.is_global_zero:
            fit = None if self._kmeans_from_state() else self._fit_kmeans
            scores = score_split(split, out, self.cluster_settings.get("pca_dim"), self.seed, fit,
                                 self.k, self.head_sizes())
        scores = self.trainer.strategy.broadcast(scores, src=0)
        for name, value in sorted(scores.items()):
            self.log(name, float(value), prog_bar=name == "val/silhouette", sync_dist=True)

    def _records_heads(self) -> bool:
        """Whether every head's clusters are recorded and scored on their own: when there are
        several, or one that is not the answer (each may be the chosen answer, candidates.py)."""
        return len(self.heads) > 1 or (len(self.heads) == 1 and self.answer() is None)

    def _kmeans_from_state(self) -> bool:
        """The split's images go to the training clustering's centroids (the last refresh's during
        fit, the final one when testing), so ``val/kmeans_acc`` means one computation in the curves
        and in ``metrics.json``. k-means is fitted on the split instead before the first clustering,
        and in a stage that keeps a clustering while its backbone trains on (refresh ``once`` or
        ``never``: the centroids describe features the backbone has left)."""
        if self.cluster_state is None:
            return False
        return self.trainer.testing or self.refresh_policy == "every" or self.features_fixed

    def _fit_kmeans(self, features: torch.Tensor) -> torch.Tensor:
        """k-means of the current validation features."""
        k = min(self.k, len(features))
        settings = {key: self.cluster_settings[key] for key in ("pca_dim", "niter", "nredo")}
        return cluster_features(features, k, seed=self.seed, **settings).labels

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.eval_splits[dataloader_idx])

    def on_test_epoch_end(self) -> None:
        for split in self.eval_splits:
            self._eval_epoch_end(split)

    # ------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.targets.save(checkpoint)
        checkpoint["answer"] = self.answer() or "kmeans"
        checkpoint["mtl_config"] = self.config
        checkpoint["backbone_weights"] = {"start": getattr(self.backbone, "weights", "random"),
                                          "frozen": bool(getattr(self.backbone, "frozen", False))}
        checkpoint["mtl_version"] = f"mtl-unsup {mtl_unsup.__version__}"
        if self.feature_bank is not None:
            checkpoint["feature_bank"] = self.feature_bank.checkpoint_state()
        # The augmentations and random heads draw from the global RNGs: a resumed run must
        # continue their streams exactly where the interrupted one stood.
        checkpoint["rng_states"] = collect_rng_states()

    def load_weights(self, checkpoint: dict[str, Any], where: str = "the checkpoint",
                     other_tasks: bool = False) -> None:
        """Weights and clustering of a checkpoint, not its optimizer, epoch or RNG states: for a
        new run from a checkpoint, and for prediction. ``other_tasks``: the checkpoint may lack
        whole tasks of this model (they start from their own initialisation) or hold tasks it
        lacks (left out), as a stage started from another run's checkpoint that trained other
        tasks; the backbone and every task both have must still fit."""
        state, fresh, extra = checkpoint["state_dict"], [], []
        if other_tasks:
            state, fresh, extra = self._shared_tasks(state)
        try:
            result = self.load_state_dict(state, strict=not fresh)
            missing = [k for k in result.missing_keys if k.split(".")[:2] not in
                       (["tasks", name] for name in fresh)]
            if missing or result.unexpected_keys:  # only the fresh tasks may be missing
                raise RuntimeError("; ".join(
                    f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for keys, what in
                    ((missing, "missing"), (result.unexpected_keys, "unexpected")) if keys))
        except RuntimeError as err:
            made_by = checkpoint.get("mtl_version", "an older mtl-unsup")
            # torch's first line names no key; the lines after it do
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = "; ".join(lines[1:] or lines)
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise CheckpointError(
                f"{where} does not fit this model (written by {made_by}; backbone, tasks or k "
                f"differ): {detail} Use a checkpoint of the same model and version, or train a "
                "new one.") from None
        if fresh:
            rank_zero_only(log.info)("%s has no weights of task(s) %s: they start from their own "
                                     "initialisation.", where, ", ".join(fresh))
        if extra:
            rank_zero_only(log.info)("%s: its task(s) %s are not in this run: left out.", where,
                                     ", ".join(extra))
        self._adopt_clustering(checkpoint)

    def _shared_tasks(self, state: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
        """``state`` without the tasks this model lacks; this model's tasks (those with weights)
        that it lacks; the tasks it holds that this model lacks."""
        held = {k.split(".")[1] for k in state if k.startswith("tasks.")}
        weighted = {k.split(".")[1] for k in self.state_dict() if k.startswith("tasks.")}
        extra, fresh = sorted(held - set(self.tasks)), sorted(weighted - held)
        kept = {k: v for k, v in state.items() if not k.startswith("tasks.") or k.split(".")[1] not in extra}
        return kept, fresh, extra

    def _adopt_clustering(self, checkpoint: dict[str, Any]) -> None:
        if not self.ignore_checkpoint_clustering:
            self.targets.load(checkpoint, self.tasks)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._adopt_clustering(checkpoint)
        if self.feature_bank is not None and "feature_bank" in checkpoint:
            self.feature_bank.load_checkpoint_state(checkpoint["feature_bank"])
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Restored here, not at load time: the trainer draws from the RNGs in between.
        states = getattr(self, "_rng_to_restore", None)
        if states is not None:
            set_rng_states(states)
            self._rng_to_restore = None
