"""What `data=folder` trains by default: the staged protocol of conf/protocol/folder.yaml, sized
by the folder's training images; `protocol=single` and every other data option train one stage."""

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from mtl_unsup.cli import NEEDED_GROUPS, removed_group
from mtl_unsup.config import CONF_DIR, ConfigValueError, check_config
from mtl_unsup.stage_checks import mixed_protocol, replaced_overrides
from mtl_unsup.staged import stage_line
from mtl_unsup.stages import drop_unstaged_tasks, plan_stages, size_stages
from mtl_unsup.train import train

from .conftest import TINY, compose_cfg, tiny_folder_overrides, write_shapes
from .test_stages import Record


class Sizes(L.Callback):
    """The training images each stage's trainer sees."""

    def __init__(self) -> None:
        self.num_train: list[int] = []

    def on_fit_start(self, trainer, module) -> None:
        self.num_train.append(trainer.datamodule.num_train)


def listed(cfg) -> list[str]:
    return [n for n, t in cfg.task.items() if "_target_" in t]


def test_a_folder_gets_the_staged_protocol_other_data_and_protocol_single_one_stage(tmp_path):
    folder = compose_cfg(tmp_path, ["data=folder", "data.root=/x"])
    check_config(folder)
    assert list(folder.stages) == ["pretext", "scan"] and folder.protocol_name == "folder"
    assert drop_unstaged_tasks(folder) == ["cluster", "rotation"]
    assert listed(folder) == ["contrastive", "scan"]
    assert list(folder.backbone.widths) == [32, 64, 128, 256]  # the depth measured on CIFAR-10
    # named on the command line (as the peers benchmark does), on a folder or on any other data
    for named in (["data=folder", "data.root=/x", "protocol=folder"], ["protocol=folder"]):
        cfg = compose_cfg(tmp_path, named)
        assert cfg.protocol_name == "folder" and list(cfg.stages) == ["pretext", "scan"]
        assert list(cfg.backbone.widths) == [32, 64, 128, 256]
    resnet = compose_cfg(tmp_path, ["data=folder", "data.root=/x", "backbone=resnet18"])
    assert "widths" not in resnet.backbone
    mnist = compose_cfg(tmp_path, ["data=mnist", "data.root=/x"])  # extends data=folder
    assert mnist.stages is None and mnist.protocol_name is None
    named = compose_cfg(tmp_path, ["data=mnist", "data.root=/x", "protocol=folder"])
    assert named.protocol_name == "folder"  # the command line wins over the data option
    for overrides in (["data=folder", "data.root=/x", "protocol=single"], []):  # [] is make train's
        cfg = compose_cfg(tmp_path, overrides)
        check_config(cfg)
        assert cfg.stages is None and listed(cfg) == ["cluster", "rotation", "contrastive"]
        assert list(cfg.backbone.widths) == [32, 64, 128]
    # an experiment on a folder keeps its own stages whole: none of the protocol's keys leak in
    cpu = compose_cfg(tmp_path, ["experiment=scan_cifar10_cpu", "data.root=/x"])
    check_config(cpu)
    assert cpu.stages.pretext.epochs == 58 and "images" not in cpu.stages.pretext
    assert cpu.protocol_name is None and drop_unstaged_tasks(cpu) == ["selflabel"]  # its stage is null
    one = compose_cfg(tmp_path, ["experiment=cifar10", "data.root=/x"])
    assert one.stages is None and "scan" in listed(one)
    # every experiment keeps its own recipe when pointed at a folder (as the peers benchmark does)
    for experiment in sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        cfg = compose_cfg(tmp_path, [f"experiment={experiment}", "data=folder", "data.root=/x"])
        assert cfg.protocol_name is None, experiment
        assert not any("images" in (s or {}) for s in (cfg.stages or {}).values()), experiment


def test_a_task_list_without_the_protocols_tasks_gets_one_message_naming_the_fix(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=folder", "data.root=/x", "task=[cluster,scan]"])
    with pytest.raises(ConfigValueError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "\n" not in message and "lacks contrastive" in message
    assert "task=[cluster,scan,contrastive]" in message and "protocol=single" in message
    cfg = compose_cfg(tmp_path, ["data=folder", "data.root=/x", "backbone.freeze=true"])
    frozen = r"backbone.freeze=true .* protocol=single task=\[cluster,scan\]"
    with pytest.raises(ConfigValueError, match=frozen):
        check_config(cfg)


def test_run_settings_every_stage_replaces_are_named_not_ignored(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=folder", "data.root=/x"])
    check_config(cfg)
    given = ["optimizer.lr=0.1", "data.batch_size=64", "seed=1", "+scheduler.eta_min=0",
             "trainer.max_epochs=3", "stages.pretext.optimizer.lr=0.1", "data.image_size=32"]
    problems = replaced_overrides(cfg, given)
    assert [p.split(":")[0] for p in problems] == ["optimizer.lr=0.1", "data.batch_size=64",
                                                   "+scheduler.eta_min=0", "trainer.max_epochs=3"]
    assert "stages.pretext.optimizer.lr=..." in problems[0] and "protocol=single" in problems[0]
    assert "stages.pretext.epochs=..." in problems[3]
    with open_dict(cfg):
        cfg.stages.scan.pop("scheduler")  # a stage without its own scheduler takes the run's
    assert not any(p.startswith("+scheduler") for p in replaced_overrides(cfg, given))
    single = compose_cfg(tmp_path, ["data=folder", "data.root=/x", "protocol=single"])
    assert replaced_overrides(single, given) == []


def test_images_size_each_stage_by_the_training_set_and_its_schedule_follows(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=folder", "data.root=/x", "stages.pretext.images=1000",
                                 "stages.pretext.epochs=50"])
    check_config(cfg)
    for num_train, cap, epochs in ((90, None, 12), (5, None, 50), (90, 3, 3), (2000, None, 1)):
        with_cap = cfg.copy()
        with_cap.max_stage_epochs = cap
        plan = plan_stages(with_cap)
        size_stages(plan, with_cap, num_train)
        assert plan[0].cfg.trainer.max_epochs == epochs
        assert plan[0].cfg.scheduler.T_max == epochs  # the cosine schedule ends with the stage
    assert plan[1].cfg.trainer.max_epochs == 200  # 1,500,000 images over 2,000: 750, at most 200
    cfg.stages.pretext.images = 0
    with pytest.raises(ConfigValueError, match="stages.pretext.images=0"):
        check_config(cfg)


def test_a_staged_protocol_named_beside_an_experiment_is_refused_not_merged():
    assert "experiment=cifar10" in mixed_protocol(["seed=1", "protocol=folder"], "cifar10")
    assert mixed_protocol(["protocol=single"], "scan_mnist") is None  # what the experiments set
    assert mixed_protocol(["protocol=folder", "data=folder"], None) is None
    assert mixed_protocol(["data=folder"], "cifar10") is None  # the experiment's own choice
    for removed in ("protocol=null", "~protocol"):  # Hydra would stop with a traceback
        assert "protocol=single" in removed_group(["seed=1", removed], NEEDED_GROUPS["train"])
    assert removed_group(["protocol=single", "backbone.widths=null"], NEEDED_GROUPS["train"]) is None


def test_the_stage_line_says_how_long_each_stage_trains(tmp_path):
    for overrides, num_train, pretext in (
            ([], 50_000, "58 epochs for 2,900,000 images over 50,000)"),
            ([], 2_000, "500 epochs for 2,900,000 images over 2,000: capped, 1,000,000 images)"),
            (["debug=fdr"], 256, "fast_dev_run: 1 batch)"),  # not the 500 epochs it will not run
            (["debug=overfit"], 512, "30 epochs for 2,900,000 images over 512: capped, 15,360 images, "
                                     "overfit_batches: 1)")):
        cfg = compose_cfg(tmp_path, ["data=folder", "data.root=/x", *overrides])
        plan = plan_stages(cfg)
        size_stages(plan, cfg, num_train)
        line = stage_line(plan[0], len(plan), cfg.stages.pretext.images, num_train)
        assert line == f"stage 1 of 2: pretext (contrastive; {pretext}"
    cpu = compose_cfg(tmp_path, ["experiment=scan_cifar10_cpu", "data.root=/x"])
    check_config(cpu)  # drops its null selflabel stage
    plan = plan_stages(cpu)
    assert stage_line(plan[1], 2, None, 50_000) == "stage 2 of 2: scan (scan; 30 epochs)"


@pytest.mark.slow
def test_a_folder_alone_trains_both_stages_end_to_end(tmp_path):
    root = write_shapes(tmp_path / "shapes", per_class=24)
    tiny = [o for o in TINY if not o.startswith(("trainer.max_epochs", "task.cluster", "report"))]
    # the image size and normalisation left null, as a folder alone leaves them: every stage and
    # the report at the end get the values filled in
    overrides = [*tiny, "data=folder", f"data.root={root}", "data.channels=1",
                 "stages.pretext.images=200", "stages.pretext.batch_size=16", "stages.scan.images=120",
                 "stages.scan.batch_size=16", "task.scan.num_neighbors=5"]
    record, sizes = Record(), Sizes()
    metrics = train(compose_cfg(tmp_path / "run", overrides), extra_callbacks=(record, sizes))
    run = tmp_path / "run"
    assert [s["tasks"] for s in record.seen] == [["contrastive"], ["scan"]]
    assert [s["optimizer"] for s in record.seen] == ["SGD", "Adam"]
    assert record.seen[1]["views"] == {"scan_strong": 1}
    # 72 images less the held-out splits; each stage reads at least its images, in whole epochs
    n = sizes.num_train[0]
    assert 30 < n < 72 and sizes.num_train == [n, n]
    epochs = [len((run / s / "epochs.jsonl").read_text().splitlines()) for s in ("pretext", "scan")]
    assert epochs == [-(-200 // n), -(-120 // n)] and epochs[0] > epochs[1]
    assert "scan/test/kmeans_acc" in metrics and "pretext/test/kmeans_acc" in metrics
    ckpt = torch.load(run / "checkpoints" / "scan" / "last.ckpt", weights_only=True)
    assert sorted(OmegaConf.create(ckpt["mtl_config"]).task) == ["contrastive", "scan"]
    assert (run / "report.html").is_file() and OmegaConf.create(ckpt["mtl_config"]).data.image_size == 32


def test_a_task_a_trained_task_reads_is_kept(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=folder", "data.root=/x", "stages.pretext=null"])
    check_config(cfg)  # SCAN alone, mining in the contrastive task's projection: it stays
    assert list(cfg.stages) == ["scan"] and drop_unstaged_tasks(cfg) == ["cluster", "rotation"]
    assert listed(cfg) == ["contrastive", "scan"]


@pytest.mark.slow
def test_resuming_a_one_stage_run_as_stages_is_refused(tmp_path):
    root = write_shapes(tmp_path / "shapes")
    run = tmp_path / "run"
    train(compose_cfg(run, tiny_folder_overrides(root)))
    (run / "metrics.json").unlink()  # as if it had been killed before its end
    staged = [o for o in tiny_folder_overrides(root) if o != "protocol=single" and not o.startswith(
        ("trainer.max_epochs", "task.cluster", "data.batch_size"))]
    with pytest.raises(ConfigValueError, match="holds a run of one stage .* protocol=single"):
        train(compose_cfg(run, [*staged, "resume=true"]))
    assert not (run / "checkpoints" / "pretext").exists()  # nothing trained beside it
