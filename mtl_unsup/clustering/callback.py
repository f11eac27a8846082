"""Refreshes the pseudo-labels with k-means on the backbone's features (DeepCluster)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.functional.clustering import normalized_mutual_info_score

from mtl_unsup.clustering.kmeans import ClusterState, cluster_features, matching_permutation
from mtl_unsup.metrics import score_clustering


@torch.no_grad()
def extract_features(trainer: L.Trainer, module: L.LightningModule) -> torch.Tensor:
    """Backbone features of the whole training set, plain images, eval mode, ordered by index.

    Each rank reads its shard; features are gathered with their dataset indices, and the
    duplicates that ``DistributedSampler`` pads in are dropped by writing rows by index.
    """
    datamodule = trainer.datamodule
    loader = datamodule.cluster_dataloader(trainer.world_size, trainer.global_rank)
    was_training = module.training
    module.eval()
    feats, indices = [], []
    try:
        with trainer.precision_plugin.forward_context():
            for batch in loader:
                feats.append(module.features(batch["image"].to(module.device)).float())
                indices.append(batch["index"].to(module.device))
    finally:
        module.train(was_training)
    features, index = torch.cat(feats), torch.cat(indices)
    if trainer.world_size > 1:
        features = module.all_gather(features).flatten(0, 1)
        index = module.all_gather(index).flatten(0, 1)
    out = torch.empty(datamodule.num_train, features.shape[1])
    out[index.cpu()] = features.cpu()
    return out


class PseudoLabelCallback(L.Callback):
    """Every ``every_n_epochs`` epochs, cluster the training set and hand the labels to the module.

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

    def __init__(self, k: int, pca_dim: int | None = 128, niter: int = 20, nredo: int = 1,
                 every_n_epochs: int = 1, seed: int = 0, warm_start: bool = True) -> None:
        if k < 2:
            raise ValueError(f"cluster.k={k}: at least 2 clusters are needed.")
        if every_n_epochs < 1:
            raise ValueError(f"cluster.every_n_epochs={every_n_epochs} must be >= 1.")
        self.k, self.pca_dim, self.niter, self.nredo = k, pca_dim, niter, nredo
        self.every_n_epochs, self.seed, self.warm_start = every_n_epochs, seed, warm_start

    def refresh(self, trainer: L.Trainer, module: L.LightningModule, reset_head: bool) -> dict:
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
        if trainer.is_global_zero:
            state = cluster_features(features, self.k, self.pca_dim, self.niter, self.nredo,
                                     seed=self.seed + epoch, epoch=epoch, init_labels=init)
            task = module.cluster_task
            if not reset_head and task is not None:
                with torch.no_grad():
                    head = task.logits(features.to(module.device)).argmax(1).cpu()
                state = state.relabelled(matching_permutation(state.labels, head, state.k))
        state = trainer.strategy.broadcast(state, src=0)
        stats = self._stats(trainer, module.cluster_state, state)
        module.set_cluster_state(state, reset_head=reset_head)
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

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        state = module.cluster_state
        epoch = trainer.current_epoch
        due = epoch % self.every_n_epochs == 0
        if state is not None and (state.epoch == epoch or not due):
            if module.cluster_task is not None and module.cluster_task.pseudo_labels is None:
                module.set_cluster_state(state, reset_head=False)
            return
        stats = self.refresh(trainer, module, reset_head=True)
        for name, value in stats.items():
            module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        rank_zero_info(f"epoch {epoch} clusters: "
                       + ", ".join(f"{k.split('/')[1]}={v:.3g}" for k, v in stats.items()))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Final assignment with the final weights, so k-means evaluation matches the model."""
        self.refresh(trainer, module, reset_head=False)
