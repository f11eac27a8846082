import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.data.images import ImageList
from mtl_unsup.models.backbones import SmallCNN
from mtl_unsup.models.module import MultiTaskModule
from mtl_unsup.tasks import ClusterTask, ContrastiveTask, RotationTask, TaskBatch
from mtl_unsup.train import build_run

from .conftest import compose_cfg, tiny_folder_overrides


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_losses(cfg, permute_labels: bool) -> list[float]:
    run = build_run(cfg)
    if permute_labels:
        for name, split in run.datamodule.splits.items():
            g = torch.Generator().manual_seed(1)
            perm = torch.randperm(len(split), generator=g).tolist()
            labels = tuple(split.labels[i] for i in perm)
            run.datamodule.splits[name] = ImageList(split.paths, labels, split.classes)
    recorder = LossRecorder()
    run.trainer.callbacks.append(recorder)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return recorder.losses


def test_ground_truth_labels_never_reach_a_loss(shapes_dir, tmp_path):
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=3"]
    plain = fit_losses(compose_cfg(tmp_path / "a", overrides), permute_labels=False)
    permuted = fit_losses(compose_cfg(tmp_path / "b", overrides), permute_labels=True)
    assert len(plain) > 5
    assert plain == permuted


def make_module(tasks, k=3):
    aug = {"weak": torch.nn.Identity(), "strong": torch.nn.Identity()}
    opt = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    return MultiTaskModule(SmallCNN(1, (4, 8)), tasks, k, opt, augmentations=aug)


def test_cluster_loss_looks_pseudo_labels_up_by_dataset_index():
    task = ClusterTask(balance="none")
    module = make_module({"cluster": task})
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    task.adopt(ClusterState(labels, torch.randn(3, 4), torch.zeros(4), torch.eye(4)), reset_head=False)
    x = torch.rand(3, 1, 8, 8)
    index = torch.tensor([5, 1, 3])
    batch = TaskBatch({"weak": [x]}, index, module.backbone)
    expected = F.cross_entropy(task.head(module.backbone(x)), torch.tensor([2, 0, 1]))
    assert torch.allclose(task.loss(batch), expected)


def test_tasks_share_backbone_features_of_a_view():
    calls = []
    backbone = SmallCNN(1, (4,))
    batch = TaskBatch({"strong": [torch.rand(2, 1, 8, 8)] * 2}, torch.arange(2),
                      lambda x: calls.append(1) or backbone(x))
    batch.features("strong", 0)
    batch.features("strong", 0)
    assert len(calls) == 1


def test_a_zero_weight_task_is_off_and_costs_no_augmentation():
    tasks = {"rotation": RotationTask(weight=0.0), "contrastive": ContrastiveTask(weight=2.0)}
    module = make_module(tasks)
    assert module.view_counts == {"strong": 2}
    assert not tasks["rotation"].active(0) and tasks["contrastive"].active(0)
    assert ContrastiveTask(start_epoch=3).active(3) and not ContrastiveTask(start_epoch=3).active(2)


def test_a_task_asking_for_a_missing_view_is_named():
    with pytest.raises(ValueError, match=r"task\.rotation reads the view 'colour'"):
        make_module({"rotation": RotationTask(view="colour")})


def test_an_empty_task_list_is_refused():
    with pytest.raises(ValueError, match="task list is empty"):
        make_module({})


def test_a_step_with_no_active_task_is_skipped():
    module = make_module({"cluster": ClusterTask(start_epoch=5)})
    batch = {"image": torch.rand(4, 1, 8, 8), "index": torch.arange(4), "label": torch.zeros(4)}
    assert module.training_step(batch, 0) is None


def test_predictions_do_not_depend_on_the_other_images_of_the_batch(shapes_dir):
    from omegaconf import OmegaConf

    from mtl_unsup.data import scan_folder
    from mtl_unsup.inference import predict_images

    task = ClusterTask()
    module = make_module({"cluster": task})
    labels = torch.tensor([0, 1, 2])  # a clustering makes the head the answer
    task.adopt(ClusterState(labels, torch.randn(3, 4), torch.zeros(module.backbone.feature_dim),
                            torch.eye(module.backbone.feature_dim)[:, :4]), reset_head=False)
    module.train()  # as Lightning leaves it after fit and test
    cfg = OmegaConf.create({"data": {"channels": 1, "image_size": 16}})
    images = scan_folder(shapes_dir)
    alone = predict_images(module, cfg, images, batch_size=1, progress=False)
    together = predict_images(module, cfg, images, batch_size=len(images), progress=False)
    assert (alone.clusters == together.clusters).all()
    assert torch.allclose(torch.from_numpy(alone.features), torch.from_numpy(together.features), atol=1e-5)
    assert module.training


def test_channels_last_computes_the_same_features_and_checkpoints_load_either_way():
    torch.manual_seed(0)
    aug = {"weak": torch.nn.Identity(), "strong": torch.nn.Identity()}

    def build(channels_last: bool) -> MultiTaskModule:
        tasks = {"rotation": RotationTask(), "contrastive": ContrastiveTask()}
        return MultiTaskModule(SmallCNN(3, (4, 8)), tasks, 3, None, augmentations=aug,
                               mean=(0.5,) * 3, std=(0.5,) * 3, channels_last=channels_last)

    plain, fast = build(False), build(True)
    fast.load_state_dict(plain.state_dict())
    conv = next(m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(6, 3, 8, 8)
    assert fast.normalize(x).is_contiguous(memory_format=torch.channels_last)
    assert not plain.normalize(x).is_contiguous(memory_format=torch.channels_last)
    plain.eval(), fast.eval()
    assert torch.allclose(plain.features(x), fast.features(x), atol=1e-5)
    plain.load_state_dict(fast.state_dict())  # a channels-last checkpoint loads into a plain model
    assert torch.allclose(plain.features(x), fast.features(x), atol=1e-5)


def test_validation_assigns_to_the_training_clustering_once_there_is_one(shapes_dir, tmp_path, monkeypatch):
    """val/kmeans_acc means one computation in the curves and in metrics.json: the images go to the
    training clustering's centroids, never to a k-means refitted on the split, once one exists."""
    def refit(self, features):
        raise AssertionError("validation refitted k-means although the training clustering exists")

    monkeypatch.setattr(MultiTaskModule, "_fit_kmeans", refit)
    # clustered from epoch 0 (task.cluster.start_epoch=0), and no validation before that
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.num_sanity_val_steps=0"]
    cfg = compose_cfg(tmp_path, overrides)
    from mtl_unsup.history import read_history
    from mtl_unsup.train import train

    metrics = train(cfg)
    rows = read_history(tmp_path / "epochs.jsonl")
    assert all("val/kmeans_acc" in r for r in rows) and "val/kmeans_acc" in metrics
