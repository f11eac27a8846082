"""Refreshes every task's dataset-level targets from one feature pass (DeepCluster and after)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.functional.clustering import normalized_mutual_info_score

from mtl_unsup.clustering.kmeans import ClusterState, matching_permutation
from mtl_unsup.clustering.refresh import ClusterSettings, RefreshContext
from mtl_unsup.clustering.sharded import ShardedContext
from mtl_unsup.distributed import gather_rows, sum_over_ranks
from mtl_unsup.errors import NonFiniteLossError
from mtl_unsup.inference import eval_mode
from mtl_unsup.metrics import score_clustering


@torch.no_grad()
def extract_features(trainer: L.Trainer, module: L.LightningModule) -> torch.Tensor:
    """Backbone features of the whole training set, plain images, eval mode, ordered by index.

    Each rank reads its shard; features are gathered with their dataset indices, and the
    duplicates that ``DistributedSampler`` pads in are dropped by writing rows by index.
    """
    shard, index = shard_features(trainer, module, pad=True)
    features = gather_rows(shard.to(module.device))
    index = gather_rows(index.to(module.device))
    out = torch.empty(trainer.datamodule.num_train, shard.shape[1])
    out[index.cpu()] = features.cpu()
    return out


def check_finite(features: torch.Tensor, epoch: int, sharded: bool = False) -> None:
    """Stop, naming the cause, when the weights have diverged: k-means cannot cluster NaN or
    infinite features (FAISS would fail with its own error). With ``sharded`` each rank holds
    its own rows, and the ranks agree before any stops (a collective)."""
    bad = torch.tensor([float((~torch.isfinite(features)).any())])
    if sharded:
        bad = sum_over_ranks(bad)
    if bool(bad.item()):
        raise NonFiniteLossError(
            f"The training images' features are not finite at epoch {epoch}: the weights have "
            "diverged, and they cannot be clustered.")


@torch.no_grad()
def shard_features(trainer: L.Trainer, module: L.LightningModule,
                   pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the training set's features (plain images, eval mode, on the CPU)
    and their dataset indices: each image on exactly one rank, or, with ``pad``, equal shares
    with a few images repeated (``DistributedSampler``). Nothing is gathered."""
    loader = trainer.datamodule.cluster_dataloader(trainer.world_size, trainer.global_rank, pad=pad)
    feats, indices = [], []
    with eval_mode(module), trainer.precision_plugin.forward_context():
        for batch in loader:
            feats.append(module.features(batch["image"].to(module.device)).float().cpu())
            indices.append(batch["index"].cpu())
    if not feats:  # more ranks than training images: this one holds none
        return torch.empty(0, module.backbone.feature_dim), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(indices)


@torch.no_grad()
def embed_rows(trainer: L.Trainer, module: L.LightningModule, indices: torch.Tensor) -> torch.Tensor:
    """Features of the training images at ``indices`` (plain, eval mode), as the pass computes
    them; every rank computes the same rows."""
    datamodule, out = trainer.datamodule, []
    with eval_mode(module), trainer.precision_plugin.forward_context():
        for chunk in indices.split(datamodule.eval_batch_size):
            images = datamodule.train_images(chunk).to(module.device)
            out.append(module.features(images).float().cpu())
    return torch.cat(out)


class PseudoLabelCallback(L.Callback):
    """Refresh the dataset-level targets of the tasks that read them, from one feature pass.

    A task's first refresh happens at the epoch it starts, then every ``every_n_epochs`` epochs
    while it trains; no feature pass runs while no task is due. Fixed features (a frozen backbone,
    or ``data=embeddings``) give the same targets every time: a task's targets are then made once,
    when it starts, and its head keeps training on them. Each refresh also clusters the
    features with k-means at ``cluster.k`` (the module's :class:`ClusterState`, which evaluation
    and prediction assign new images with). At the end of training the final features are
    clustered once more, and each task may replace a head that is no answer (see
    :meth:`~mtl_unsup.tasks.base.Task.finish`).

    The recipe: features without augmentation -> PCA-whitening -> L2 -> what each task asks of the
    :class:`RefreshContext` (k-means labels, balanced labels, neighbours). It runs on rank 0 and is
    broadcast, so every rank trains on the same targets; every state lives in the checkpoint.
    With ``cluster.sharded=true`` no rank gathers the features: each keeps its own rows and
    every rank runs the tasks on a :class:`ShardedContext`, whose k-means is computed together.

    Args:
        k: number of clusters (``cluster.k``), or ``auto``: chosen at each refresh in
            ``settings.k_range`` by ``settings.k_criterion`` (see :meth:`RefreshContext.choose_k`).
        settings: the rest of the ``cluster`` group.
        every_n_epochs: refresh period.
        seed: k-means seed (offset by the epoch, so each refresh differs but reruns agree).
        refresh: ``every`` (each task at its start, then every ``every_n_epochs``), ``once`` (at
            a task's start only: a stage whose targets come from the previous stage's model) or
            ``never`` (the targets the task holds; a stage that keeps the previous stage's).
    """

    def __init__(self, k: int | str, settings: ClusterSettings | None = None, every_n_epochs: int = 1,
                 seed: int = 0, refresh: str = "every") -> None:
        self.auto = k == "auto"
        if not self.auto and int(k) < 2:
            raise ValueError(f"cluster.k={k}: at least 2 clusters are needed.")
        if every_n_epochs < 1:
            raise ValueError(f"cluster.every_n_epochs={every_n_epochs} must be >= 1.")
        if refresh not in ("every", "once", "never"):
            raise ValueError(f"refresh={refresh!r}: use every, once or never.")
        self.k, self.settings, self.policy = k, settings or ClusterSettings(), refresh
        self.every_n_epochs, self.seed = every_n_epochs, seed

    def context(self, trainer: L.Trainer, module: L.LightningModule,
                features: torch.Tensor) -> RefreshContext:
        previous = module.targets.previous_labels(module.tasks, len(features))
        return RefreshContext(features, trainer.current_epoch, self.seed, self.settings,
                              trainer.datamodule.fingerprint, previous, k=module.k)

    def sharded_context(self, trainer: L.Trainer, module: L.LightningModule) -> ShardedContext:
        shard, index = shard_features(trainer, module)
        check_finite(shard, trainer.current_epoch, sharded=True)
        return ShardedContext(shard, index, trainer.datamodule.num_train, trainer.current_epoch,
                              self.seed, self.settings, trainer.datamodule.fingerprint, k=module.k,
                              device=module.device)

    def contexts(self, trainer: L.Trainer, module: L.LightningModule,
                 features: torch.Tensor | None = None) -> RefreshContext | ShardedContext | None:
        """The context the tasks read: with ``cluster.sharded``, every rank's own rows (a
        collective); otherwise ``features`` (or a feature pass) on rank 0, None on the others."""
        if self.settings.sharded:
            return self.sharded_context(trainer, module)
        if features is None:
            features = extract_features(trainer, module)
        check_finite(features, trainer.current_epoch)
        return self.context(trainer, module, features) if trainer.is_global_zero else None

    def shared(self, trainer: L.Trainer, payload: Any) -> Any:
        """What rank 0 computed, on every rank (sharded contexts computed it on every rank)."""
        return payload if self.settings.sharded else trainer.strategy.broadcast(payload, src=0)

    def refresh(self, trainer: L.Trainer, module: L.LightningModule, names: list[str]) -> dict:
        """Refresh the named tasks now; returns statistics of the new k-means."""
        features, from_bank = None, False
        if module.feature_bank is not None:  # cluster.features=bank: no full pass once it fills
            features, written = module.feature_bank.gather()
            from_bank = bool(written.float().mean() >= 0.5)
            if from_bank and not written.all():  # images drop_last has left out so far
                missing = torch.nonzero(~written).squeeze(1)
                features[missing] = embed_rows(trainer, module, missing)
        ctx, payload = self.contexts(trainer, module, features if from_bank else None), None
        if ctx is not None:
            scores = ctx.choose_k() if self.auto else None
            payload = (ctx.kmeans(ctx.k), {n: module.tasks[n].refresh(ctx) for n in names}, scores)
        state, states, scores = self.shared(trainer, payload)
        stats = self.adopt(trainer, module, names, state, states, scores)
        if module.feature_bank is not None:
            stats["cluster/from_bank"] = float(from_bank)
        return stats

    def adopt(self, trainer: L.Trainer, module: L.LightningModule, names: list[str], state: ClusterState,
              states: dict, scores: dict | None = None) -> dict:
        """Give the module its new k-means and the tasks their new targets; returns statistics."""
        stats = self._stats(trainer, module.cluster_state, state)
        if scores is not None:
            module.k_selection = scores
            stats["cluster/k"] = float(state.k)
        module.cluster_state = state
        module.adopt_task_states(states, reset_head=True)
        if trainer.datamodule.has_labels:  # evaluation only: never reaches a loss
            labels = trainer.datamodule.train_labels()
            for name in names:
                for key, value in module.tasks[name].label_stats(labels).items():
                    stats[f"cluster/train_{name}_{key}"] = value
        return stats

    def _stats(self, trainer: L.Trainer, old: ClusterState | None, new: ClusterState) -> dict:
        sizes = torch.bincount(new.labels, minlength=new.k).float()
        stats = {"cluster/size_min": sizes.min(), "cluster/size_max": sizes.max(),
                 "cluster/size_cv": sizes.std() / sizes.mean()}
        if old is not None and len(old.labels) == len(new.labels):
            stats["cluster/nmi_prev"] = normalized_mutual_info_score(new.labels, old.labels)
        if trainer.datamodule.has_labels:  # evaluation only: never reaches a loss
            for name, value in score_clustering(new.labels, trainer.datamodule.train_labels()).items():
                stats[f"cluster/train_{name}"] = torch.tensor(value)
        return {k: float(v) for k, v in stats.items()}

    def due(self, module: L.LightningModule, epoch: int) -> list[str]:
        """The tasks whose targets are refreshed at the start of ``epoch``. With ``cluster.k=auto``
        a refresh may change k, so every active task with targets is refreshed with the due ones
        (they all speak of the same k)."""
        due = [name for name, task in module.tasks.items()
               if self.task_due(task, module.targets.epoch(name), epoch, module.features_fixed,
                                module.task_active(name, epoch))]
        if self.auto and due:
            return [name for name, task in module.tasks.items()
                    if task.refreshes and module.task_active(name, epoch)]
        return due

    def task_due(self, task: Any, last: int | None, epoch: int, fixed: bool, active: bool) -> bool:
        """Whether ``task`` (``active`` in this epoch of the stage), whose targets were made at
        epoch ``last`` (None: none, or due anew), gets new targets now."""
        if not task.refreshes or not active or self.policy == "never":
            return False  # nobody reads this task's targets this epoch, or they are kept
        if last is None or last < task.start_epoch:
            return True  # the task starts (or restarts from a checkpoint without targets)
        return (self.policy == "every" and not fixed and last != epoch
                and (epoch - task.start_epoch) % self.every_n_epochs == 0)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        names = self.due(module, trainer.current_epoch)
        if not names:
            return
        stats = self.refresh(trainer, module, names)
        module.targets.last_refresh = trainer.current_epoch
        for name, value in stats.items():
            module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        rank_zero_info(f"epoch {trainer.current_epoch} clusters: "
                       + ", ".join(f"{k.split('/')[1]}={v:.3g}" for k, v in stats.items()))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.finish(trainer, module)

    def finish(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Final k-means with the final weights, so k-means evaluation matches the model.

        Each task may replace a head that is no answer (a clustering head that never trained,
        or fell apart, becomes the nearest-centroid classifier of this k-means); the run says
        so. The final clusters are then renamed to agree with the answer head, so head and
        k-means speak of the same cluster numbers. Nothing here reads a label.
        """
        ctx, payload = self.contexts(trainer, module), None
        if ctx is not None:
            # with cluster.k=auto, k is chosen here only if no refresh chose it (the heads trained
            # at the k of the last refresh)
            scores = ctx.choose_k() if self.auto and module.cluster_state is None else None
            trained = {n for n in module.tasks if module.task_weight(n) > 0}
            trained |= {h for n in trained for h in module.tasks[n].trains_heads_of()}
            replaced = {n: t.finish(ctx, module.targets.states.get(n)) for n, t in module.tasks.items()
                        if n in trained and t.refreshes}
            payload = (ctx.kmeans(ctx.k), {n: r for n, r in replaced.items() if r is not None}, scores)
        state, replaced, scores = self.shared(trainer, payload)
        if scores is not None:
            module.k_selection = scores
        module.adopt_task_states({n: s for n, (s, _) in replaced.items()}, reset_head=True,
                                 head_init="centroids")
        for name, (_, why) in replaced.items():
            rank_zero_info(f"The {name} head {why}.")
        answer = module.answer()
        if ctx is not None and answer is not None and module.head_sizes()[answer] == state.k:
            with torch.no_grad(), eval_mode(module):
                head = ctx.argmax(lambda f: module.head_logits(f.to(module.device))[answer])
            state = state.relabelled(matching_permutation(state.labels, head, state.k))
        module.cluster_state = self.shared(trainer, state)
