"""Dataset-level targets have one owner (mtl_unsup.clustering.targets), and the model is built
from its config group (mtl_unsup.models.factory)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from mtl_unsup.clustering.callback import PseudoLabelCallback
from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.config import ConfigValueError
from mtl_unsup.models.backbones import SmallCNN
from mtl_unsup.models.factory import model_factory, model_spec
from mtl_unsup.models.module import MultiTaskModule
from mtl_unsup.tasks import ClusterTask, RotationTask, ScanTask
from mtl_unsup.train import build_run

from .conftest import compose_cfg, tiny_folder_overrides


class TaggedModule(MultiTaskModule):
    """A user's subclass, named by ``model._target_``."""

    def __init__(self, *args, tag: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag


def module_with_providers() -> MultiTaskModule:
    tasks = {"cluster": ClusterTask(), "rotation": RotationTask(), "scan": ScanTask(num_neighbors=2)}
    aug = {"weak": torch.nn.Identity()}
    return MultiTaskModule(SmallCNN(1, (4, 8)), tasks, 3, None, augmentations=aug)


def kmeans(labels: list[int], epoch: int) -> ClusterState:
    g = torch.Generator().manual_seed(epoch)
    return ClusterState(torch.tensor(labels), torch.randn(3, 8, generator=g), torch.zeros(8), torch.eye(8),
                        epoch=epoch)


def test_the_targets_live_in_one_place_and_come_back_from_a_checkpoint():
    module = module_with_providers()
    neighbours = torch.tensor([[1, 2], [0, 2], [0, 1], [1, 2]])
    module.cluster_state = kmeans([0, 1, 2, 1], epoch=4)
    module.k_selection = {2: 0.1, 3: 0.3}
    module.adopt_task_states({"cluster": kmeans([2, 1, 0, 1], epoch=4),
                              "scan": {"neighbours": neighbours, "epoch": 3}})
    targets = module.targets
    assert targets.epoch("cluster") == 4 and targets.epoch("scan") == 3 and targets.epoch("rotation") is None
    # the tasks read what the owner holds, by dataset index; none keeps a copy of the state
    assert torch.equal(module.tasks["cluster"].pseudo_labels, targets.states["cluster"].labels)
    assert torch.equal(module.tasks["scan"].neighbours, targets.states["scan"]["neighbours"])
    assert not any(hasattr(t, attr) for t in module.tasks.values() for attr in ("state", "refreshed_epoch"))

    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["task_states"]) == {"cluster", "scan"}  # rotation makes no targets
    fresh = module_with_providers()
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.targets.epoch("cluster") == 4 and fresh.targets.epoch("scan") == 3
    assert torch.equal(fresh.cluster_state.labels, torch.tensor([0, 1, 2, 1]))
    assert fresh.k_selection == {2: 0.1, 3: 0.3}
    assert torch.equal(fresh.tasks["cluster"].pseudo_labels, torch.tensor([2, 1, 0, 1]))
    assert torch.equal(fresh.tasks["scan"].neighbours, neighbours)
    assert fresh.targets.states["scan"]["usable"]  # every field set, as the owner keeps it
    # k-means starts from the labels the providers hold, the run's own k-means winning for its k
    previous = fresh.targets.previous_labels(fresh.tasks, rows=4)
    assert torch.equal(previous[3], torch.tensor([0, 1, 2, 1]))
    assert fresh.targets.previous_labels(fresh.tasks, rows=5) == {}  # labels of other images


def test_targets_made_due_anew_are_kept_and_refreshed_at_the_next_epoch():
    module = module_with_providers()
    module.adopt_task_states({"cluster": kmeans([2, 1, 0, 1], epoch=4)}, reset_head=False)
    callback = PseudoLabelCallback(3, every_n_epochs=10)
    assert "cluster" not in callback.due(module, 5)  # made at epoch 4, next at 14
    module.targets.mark_due("cluster")  # a stage that remakes its targets at its start
    assert "cluster" in callback.due(module, 5)
    assert "cluster" in module.targets.states  # the old labels stay, for k-means to start from
    never = PseudoLabelCallback(3, refresh="never")
    assert never.due(module, 5) == []


def test_a_module_class_named_by_the_model_group_is_built(shapes_dir, tmp_path):
    target = f"{__name__}.TaggedModule"
    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), f"model._target_={target}",
                                 "+model.tag=mine", "cluster.answer=cluster"])
    module = build_run(cfg).module
    assert isinstance(module, TaggedModule) and module.tag == "mine"
    assert module.answer_setting == "cluster" and module.seed == cfg.seed  # the group's interpolations


@pytest.mark.parametrize("change, message", [
    ({"anwser": "auto"}, "model.anwser is not an argument of mtl_unsup.models.module.MultiTaskModule; "
                         "the model group sets seed, cluster_settings, answer, channels_last"),
    ({"tasks": {}}, "model.tasks is set when the model is built"),
    ({"_target_": "mtl_unsup.models.nowhere.Module"}, "model._target_='mtl_unsup.models.nowhere.Module' "
                                                      "cannot be built"),
    ({"_target_": "mtl_unsup.models.factory.model_spec"}, "is not a class"),
])
def test_a_wrong_model_group_is_named(tmp_path, change, message):
    cfg = compose_cfg(tmp_path)
    with open_dict(cfg):
        cfg.model = OmegaConf.merge(cfg.model, change)
    with pytest.raises(ConfigValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        model_factory(cfg)


def test_a_config_from_before_the_model_group_builds_the_same_model(tmp_path):
    cfg = compose_cfg(tmp_path, ["cluster.answer=cluster", "seed=7", "cluster.pca_dim=16"])
    today = OmegaConf.to_container(cfg.model, resolve=True)
    with open_dict(cfg):
        cfg.model = None  # a checkpoint's config written before the group existed
    assert OmegaConf.to_container(model_spec(cfg), resolve=True) == today
