"""Refreshes the pseudo-labels with k-means on the backbone's features (DeepCluster)."""

from __future__ import annotations

import dataclasses

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.functional.clustering import normalized_mutual_info_score

from mtl_unsup.clustering.kmeans import ClusterState, cluster_features, matching_permutation
from mtl_unsup.distributed import gather_rows
from mtl_unsup.inference import eval_mode
from mtl_unsup.metrics import score_clustering


@torch.no_grad()
def extract_features(trainer: L.Trainer, module: L.LightningModule) -> torch.Tensor:
    """Backbone features of the whole training set, plain images, eval mode, ordered by index.

    Each rank reads its shard; features are gathered with their dataset indices, and the
    duplicates that ``DistributedSampler`` pads in are dropped by writing rows by index.
    """
    datamodule = trainer.datamodule
    loader = datamodule.cluster_dataloader(trainer.world_size, trainer.global_rank)
    feats, indices = [], []
    with eval_mode(module), trainer.precision_plugin.forward_context():
        for batch in loader:
            feats.append(module.features(batch["image"].to(module.device)).float())
            indices.append(batch["index"].to(module.device))
    features, index = gather_rows(torch.cat(feats)), gather_rows(torch.cat(indices))
    out = torch.empty(datamodule.num_train, features.shape[1])
    out[index.cpu()] = features.cpu()
    return out


# Below this NMI between the trained head and the final k-means, the head is no answer.
MIN_HEAD_AGREEMENT = 0.5


class PseudoLabelCallback(L.Callback):
    """Cluster the training set when a task reads the result, and hand the labels to the module.

    The first clustering happens at the epoch the clustering task starts, then every
    ``every_n_epochs`` epochs; no k-means runs while no task reads its labels. At the end of
    training the final features are clustered once more, for evaluation and prediction.

    The recipe: features without augmentation -> PCA-whitening -> L2 -> FAISS k-means (no cluster
    left empty) -> the module's clustering head is re-initialised. Clustering runs on rank 0 and is
    broadcast, so every rank trains on the same labels. The resulting :class:`ClusterState` lives on
    the module and is saved in its checkpoints.

    Args:
        k: number of clusters.
        pca_dim: whitening dimension (None or 0: no PCA).
        niter: k-means iterations; nredo: k-means restarts (the best objective is kept).
        every_n_epochs: re-cluster period.
        seed: k-means seed (offset by the epoch, so each refresh differs but reruns agree).
        warm_start: also start k-means from the previous clusters' means; the start with the
            lowest objective wins (see :func:`cluster_features`).
    """

    def __init__(self, k: int, pca_dim: int | None = 32, niter: int = 20, nredo: int = 5,
                 every_n_epochs: int = 1, seed: int = 0, warm_start: bool = True) -> None:
        if k < 2:
            raise ValueError(f"cluster.k={k}: at least 2 clusters are needed.")
        if every_n_epochs < 1:
            raise ValueError(f"cluster.every_n_epochs={every_n_epochs} must be >= 1.")
        self.k, self.pca_dim, self.niter, self.nredo = k, pca_dim, niter, nredo
        self.every_n_epochs, self.seed, self.warm_start = every_n_epochs, seed, warm_start

    def refresh(self, trainer: L.Trainer, module: L.LightningModule, reset_head: bool,
                head_init: str | None = None) -> dict:
        """Re-cluster now; returns statistics of the new assignment.

        Without ``reset_head`` (the final clustering) the new clusters are renamed to agree with
        the trained head's predictions, so head and k-means speak of the same cluster numbers.
        """
        features = extract_features(trainer, module)
        epoch = trainer.current_epoch
        state = None
        previous = module.cluster_state
        init = None
        if self.warm_start and previous is not None and len(previous.labels) == len(features):
            init = previous.labels
        agreement = None
        if trainer.is_global_zero:
            state = cluster_features(features, self.k, self.pca_dim, self.niter, self.nredo,
                                     seed=self.seed + epoch, epoch=epoch, init_labels=init)
            state = dataclasses.replace(state, fingerprint=trainer.datamodule.fingerprint)
            task = module.cluster_task
            if not reset_head and task is not None:
                with torch.no_grad():
                    head = task.logits(features.to(module.device)).argmax(1).cpu()
                state = state.relabelled(matching_permutation(state.labels, head, state.k))
                agreement = float(normalized_mutual_info_score(head, state.labels))
        state, agreement = trainer.strategy.broadcast((state, agreement), src=0)
        stats = self._stats(trainer, module.cluster_state, state)
        if agreement is not None:
            stats["cluster/head_agreement"] = agreement
        module.set_cluster_state(state, reset_head=reset_head, head_init=head_init)
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

    def due(self, module: L.LightningModule, epoch: int) -> bool:
        """Whether ``epoch`` starts with a fresh clustering."""
        task = module.cluster_task
        if task is None or not task.active(epoch):
            return False  # nobody reads pseudo-labels this epoch: no k-means
        state = module.cluster_state
        if state is None or state.epoch < task.start_epoch:
            return True  # the task starts (or restarts from a checkpoint without labels)
        return state.epoch != epoch and (epoch - task.start_epoch) % self.every_n_epochs == 0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self.due(module, epoch):
            task, state = module.cluster_task, module.cluster_state
            if task is not None and task.pseudo_labels is None and state is not None:
                module.set_cluster_state(state, reset_head=False)
            return
        stats = self.refresh(trainer, module, reset_head=True)
        for name, value in stats.items():
            module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        rank_zero_info(f"epoch {epoch} clusters: "
                       + ", ".join(f"{k.split('/')[1]}={v:.3g}" for k, v in stats.items()))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.finish(trainer, module)

    def finish(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Final assignment with the final weights, so k-means evaluation matches the model.

        The clustering head is the run's answer only if it is one: a head that never trained
        (the run ended before its task started) or whose clusters no longer match the final
        k-means of the training features (NMI below ``MIN_HEAD_AGREEMENT``: it fell apart, e.g.
        into one cluster) becomes the nearest-centroid classifier of this k-means, and the run
        says so. The test reads no label.
        """
        task = module.cluster_task
        untrained = task is not None and int(task.trained_steps) == 0
        stats = self.refresh(trainer, module, reset_head=untrained, head_init="centroids")
        agreement = stats.get("cluster/head_agreement", 1.0)
        if untrained:
            why = (f"never trained (its task starts at epoch {task.start_epoch}, training ended at "
                   f"epoch {trainer.current_epoch})")
        elif agreement < MIN_HEAD_AGREEMENT:
            why = f"disagrees with the final k-means of the training features (NMI {agreement:.2f})"
            module.set_cluster_state(module.cluster_state, reset_head=True, head_init="centroids")
        else:
            return
        rank_zero_info(f"The clustering head {why}: it now predicts the final k-means clusters, "
                       "and its scores are those of k-means.")
