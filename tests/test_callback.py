import lightning as L
import torch

from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.train import build_run

from .conftest import compose_cfg, tiny_folder_overrides


class Spy(L.Callback):
    """Records the pseudo-labels and clustering-head weights around each refresh."""

    def __init__(self) -> None:
        self.labels: list[torch.Tensor] = []
        self.head_before: list[torch.Tensor] = []
        self.head_after: list[torch.Tensor] = []
        self.epochs: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, module) -> None:  # runs after the pseudo-label callback
        self.labels.append(module.cluster_state.labels.clone())
        self.epochs.append(torch.tensor(module.cluster_state.epoch))
        self.head_after.append(module.tasks['cluster'].head.linear.weight.detach().clone())

    def on_train_epoch_end(self, trainer, module) -> None:
        self.head_before.append(module.tasks['cluster'].head.linear.weight.detach().clone())


def test_pseudo_labels_refresh_and_head_is_reinitialised(shapes_dir, tmp_path):
    # an eval-mode pass at each refresh: whether the final clustering replaces a head (and its
    # moments) depends on the features, and this run was set up with the pass's
    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=3",
                                 "cluster.warm_start=false", "cluster.features=pass"])
    run = build_run(cfg)
    spy = Spy()
    run.trainer.callbacks.insert(1, spy)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert len(spy.labels) == 3
    assert [s.item() for s in spy.epochs] == [0, 1, 2]  # a fresh clustering every epoch
    assert any(not torch.equal(spy.labels[0], later) for later in spy.labels[1:])
    for epoch in (1, 2):  # the head trained in the previous epoch is replaced by a fresh one
        assert not torch.allclose(spy.head_before[epoch - 1], spy.head_after[epoch])
    # the head's Adam moments were dropped with it
    head = set(run.module.tasks['cluster'].head.parameters())
    optimizer = run.trainer.optimizers[0]
    backbone_steps = optimizer.state[next(iter(run.module.backbone.parameters()))]["step"]
    assert all(optimizer.state[p]["step"] < backbone_steps for p in head)


def test_clustering_state_survives_a_checkpoint_round_trip(shapes_dir, tmp_path):
    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=2",
                                 "cluster.features=pass"])  # as above
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    path = tmp_path / "round.ckpt"
    run.trainer.save_checkpoint(path)
    saved = run.module.cluster_state

    fresh = build_run(cfg).module
    assert fresh.cluster_state is None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.on_load_checkpoint(ckpt)
    assert isinstance(fresh.cluster_state, ClusterState)
    assert fresh.cluster_state.epoch == saved.epoch
    for key, value in saved.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh.cluster_state.state_dict()[key], value)
    assert torch.equal(fresh.tasks['cluster'].pseudo_labels, saved.labels)
