"""Schedules that waste nothing: k-means only when read, a head that never trained is no answer."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

import mtl_unsup.clustering.refresh as refresh_module
from mtl_unsup.schedule import schedule_findings
from mtl_unsup.train import train

from .conftest import compose_cfg, tiny_folder_overrides


def findings(tmp_path, *overrides: str) -> list[str]:
    cfg = compose_cfg(tmp_path, list(overrides))
    return schedule_findings(cfg, {name: instantiate(t) for name, t in cfg.task.items()})


def test_the_default_schedule_is_sound(tmp_path):
    assert findings(tmp_path) == []


@pytest.mark.parametrize(("overrides", "says"), [
    (["trainer.max_epochs=2"], "task.cluster.start_epoch=20 >= trainer.max_epochs=2"),
    (["task=[cluster]", "task.cluster.start_epoch=5"], "epochs 0-4 train nothing"),
    (["scheduler.T_max=10"], "scheduler.T_max=10 < trainer.max_epochs=80"),
    (["task.cluster.start_epoch=70"], "has left 4% of optimizer.lr"),
    (["cluster.every_n_epochs=60"], "pseudo-labels are computed once (epoch 20) and never refreshed"),
])
def test_wasteful_schedules_are_named_at_start(tmp_path, overrides, says):
    assert any(says in finding for finding in findings(tmp_path, *overrides))


def clustering_epochs(monkeypatch) -> list[int]:
    epochs: list[int] = []
    real = refresh_module.cluster_whitened

    def counting(*args, **kwargs):
        epochs.append(kwargs["epoch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(refresh_module, "cluster_whitened", counting)
    return epochs


@pytest.mark.parametrize(("start", "every", "expected"), [
    (2, 1, [2, 3]),  # nothing reads pseudo-labels before epoch 2: no k-means there
    (1, 5, [1, 3]),  # the first clustering comes exactly when the task starts
])
def test_kmeans_runs_only_when_a_task_reads_it(shapes_dir, tmp_path, monkeypatch, start, every, expected):
    epochs = clustering_epochs(monkeypatch)
    train(compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=3",
                                 f"task.cluster.start_epoch={start}", f"cluster.every_n_epochs={every}"]))
    assert epochs == expected  # the last one: the final clustering, for evaluation


def test_a_head_that_never_trained_answers_with_the_final_kmeans(shapes_dir, tmp_path, caplog):
    overrides = [o for o in tiny_folder_overrides(shapes_dir) if "start_epoch" not in o]
    metrics = train(compose_cfg(tmp_path, [*overrides, "trainer.max_epochs=2"]))  # starts at 20
    for split in ("test", "val", "train"):
        for name in ("acc", "nmi", "ari"):
            assert metrics[f"{split}/{name}"] == metrics[f"{split}/kmeans_{name}"]
        assert metrics[f"{split}/agreement"] == pytest.approx(1.0)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["tasks.cluster.trained_steps"]) == 0
    assert "The cluster head never trained" in caplog.text


class CollapseHead(L.Callback):
    """After the last epoch, the head answers cluster 0 for every image."""

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                module.tasks["cluster"].head.linear.weight.zero_()
                module.tasks["cluster"].head.linear.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))


def test_a_head_that_fell_apart_is_replaced_by_the_final_kmeans(shapes_dir, tmp_path, caplog):
    metrics = train(compose_cfg(tmp_path, tiny_folder_overrides(shapes_dir)),
                    extra_callbacks=(CollapseHead(),))
    assert "disagrees with the final k-means" in caplog.text
    for split in ("test", "train"):
        assert metrics[f"{split}/acc"] == metrics[f"{split}/kmeans_acc"]
        assert metrics[f"{split}/silhouette"] > -1  # not the one-cluster answer


def test_a_run_resumed_after_its_last_epoch_still_ends_with_the_final_clustering(shapes_dir, tmp_path):
    overrides = tiny_folder_overrides(shapes_dir)
    train(compose_cfg(tmp_path, overrides))
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)  # as if killed between the last epoch and the end
    ckpt["cluster_state"]["epoch"] = 1
    torch.save(ckpt, path)
    (tmp_path / "metrics.json").unlink()
    train(compose_cfg(tmp_path, [*overrides, "resume=true"]))  # nothing left to fit
    assert torch.load(path, weights_only=True)["cluster_state"]["epoch"] == 2
