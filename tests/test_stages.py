"""A run as stages: each its own optimiser, batch size, tasks, checkpoints and metrics; resumed
inside a stage bit for bit; a later stage started from another run's stage checkpoint; every
stage label-free; the debug presets run each stage."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mtl_unsup.config import ConfigValueError
from mtl_unsup.tasks import ScanTask
from mtl_unsup.train import train

from .conftest import compose_cfg, staged_overrides, tiny_folder_overrides, write_shapes
from .test_selection import permute_labels

SCRIPT = Path(__file__).parent / "scripts" / "staged_run.py"
STAGES = ("pretext", "scan", "selflabel")


class Record(L.Callback):
    """What each stage trains with: optimiser, learning rates, batch size, tasks, views."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            optimizer = trainer.optimizers[0]
            self.seen.append({
                "optimizer": type(optimizer).__name__, "lrs": [g["lr"] for g in optimizer.param_groups],
                "batch": len(batch["index"]), "views": dict(module.view_counts),
                "tasks": [n for n in module.tasks if module.task_active(n, 0)],
                "backbone_params": sum(p.numel() for g in optimizer.param_groups for p in g["params"]
                                       if any(p is q for q in module.backbone.parameters())),
            })


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> tuple[Path, Path, dict, list[dict]]:
    """The shapes folder and one uninterrupted staged run, with what each stage trained with."""
    tmp = tmp_path_factory.mktemp("staged")
    root = write_shapes(tmp / "shapes")
    record = Record()
    metrics = train(compose_cfg(tmp / "run", staged_overrides(root)), extra_callbacks=(record,))
    return root, tmp / "run", metrics, record.seen


def test_a_stage_switch_changes_optimizer_batch_size_tasks_and_views(staged):
    _, _, _, seen = staged
    assert [s["tasks"] for s in seen] == [["contrastive"], ["scan"], ["selflabel"]]
    assert [s["optimizer"] for s in seen] == ["AdamW", "Adam", "AdamW"]
    assert [s["batch"] for s in seen] == [16, 8, 16]
    assert seen[0]["lrs"] == [0.002] and seen[1]["lrs"] == [0.001]
    assert seen[2]["lrs"] == [0.001, 0.002]  # backbone_lr=0.5: the backbone in a group of its own
    assert seen[2]["backbone_params"] > 0
    assert seen[0]["views"] == {"strong": 2} and seen[1]["views"] == {"weak": 1}
    assert seen[2]["views"] == {"plain": 1, "weak": 1}  # targets from the plain image


def test_each_stage_leaves_its_checkpoint_and_metrics(staged):
    _, run, metrics, _ = staged
    for stage in STAGES:
        assert (run / "checkpoints" / stage / "last.ckpt").is_file()
        assert (run / stage / "epochs.jsonl").is_file()
        assert (run / "csv" / stage / "metrics.csv").is_file()
        assert f"{stage}/test/kmeans_acc" in metrics
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert "pretext/test/acc" not in saved  # no head had trained: k-means was the answer
    # the run's own metrics are those of the stage of the chosen answer, its ACC the answer's
    [chosen] = [c for c in json.loads((run / "candidates.json").read_text())["candidates"] if c["chosen"]]
    for key in ("test/kmeans_nmi", "val/silhouette"):
        assert saved[key] == saved[f"{chosen['stage']}/{key}"]
    assert saved["test/acc"] == saved[f"candidates/{chosen['stage']}/{chosen['name']}/test/acc"]
    assert list(json.loads((run / "stages.json").read_text())["done"]) == list(STAGES)
    # the neighbours were mined once, when the scan stage started, and kept by the next
    scan = torch.load(run / "checkpoints" / "scan" / "last.ckpt", weights_only=True)["task_states"]["scan"]
    last = torch.load(run / "checkpoints" / "selflabel" / "last.ckpt", weights_only=True)
    assert scan["epoch"] == 0 and torch.equal(last["task_states"]["scan"]["neighbours"], scan["neighbours"])
    assert last["answer"].startswith("scan")  # the SCAN head, trained on by self-labelling


def run_script(out: Path, kill_step: int, root: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), str(kill_step), str(root), *extra],
                          env=env, capture_output=True, text=True, timeout=600)


BUDGET = "trainer.max_time=00:01:00:00"  # never reached: the stages' Timers are saved and resumed


@pytest.mark.slow
def test_sigkill_inside_stage_two_then_resume_matches_an_uninterrupted_run(staged, tmp_path):
    root, whole, _, _ = staged
    uninterrupted = run_script(tmp_path / "whole", 0, root, "trainer.deterministic=true",
                               "checkpoint.every_n_train_steps=3", BUDGET)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    # scan stage: 42 images in batches of 8 = 5 steps an epoch; last.ckpt at step 6, killed at 7
    killed = run_script(killed_dir, 7, root, "trainer.deterministic=true", "checkpoint.every_n_train_steps=3",
                        BUDGET)
    assert killed.returncode == -signal.SIGKILL
    ckpt = torch.load(killed_dir / "checkpoints" / "scan" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # mid-epoch, inside the scan stage
    assert list(json.loads((killed_dir / "stages.json").read_text())["done"]) == ["pretext"]
    from mtl_unsup.staged import trained_seconds

    assert trained_seconds(ckpt) > 0  # Lightning's Timer state, as the run's budget reads it
    resumed = run_script(killed_dir, 0, root, "trainer.deterministic=true",
                         "checkpoint.every_n_train_steps=3", BUDGET, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 1 of 3: pretext (" not in resumed.stdout + resumed.stderr  # not trained again
    ends = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "killed")}
    assert ends["killed"] == ends["whole"]
    for stage in ("scan", "selflabel"):
        final = torch.load(killed_dir / "checkpoints" / stage / "last.ckpt", weights_only=True)
        reference = torch.load(tmp_path / "whole" / "checkpoints" / stage / "last.ckpt", weights_only=True)
        for name, value in reference["state_dict"].items():
            assert torch.equal(final["state_dict"][name], value), (stage, name)


def test_a_later_stage_starts_from_another_runs_stage_checkpoint(staged, tmp_path):
    root, run, _, _ = staged
    pretext = run / "checkpoints" / "pretext" / "last.ckpt"
    metrics = train(compose_cfg(tmp_path / "sweep", [*staged_overrides(root), "start_stage=scan",
                                                     f"ckpt_path={pretext}"]))
    assert "scan/test/acc" in metrics and not any(k.startswith("pretext/") for k in metrics)
    assert not (tmp_path / "sweep" / "checkpoints" / "pretext").exists()
    # the neighbours are mined from the same pretext weights: the same neighbours
    mined = [torch.load(d / "checkpoints" / "scan" / "last.ckpt", weights_only=True)["task_states"]["scan"]
             for d in (run, tmp_path / "sweep")]
    assert torch.equal(mined[0]["neighbours"], mined[1]["neighbours"])


@pytest.mark.parametrize("plan", [
    # the new plan's last stage adds a task the checkpoint's run never had: it starts afresh
    ["task=[contrastive,scan,selflabel,rotation]", "+stages.selflabel.tasks.rotation={}"],
    # the new plan lacks a task the checkpoint holds (SCAN mines in the features): left out
    ["task=[scan,selflabel]", "task.scan.space=features", "stages.pretext=null"],
])
def test_a_stage_starts_from_a_checkpoint_of_other_tasks(staged, tmp_path, plan, caplog):
    root, run, _, _ = staged
    scan = run / "checkpoints" / "scan" / "last.ckpt"
    start = ["start_stage=selflabel", f"ckpt_path={scan}"]
    with caplog.at_level("INFO", logger="mtl_unsup.models.module"):
        metrics = train(compose_cfg(tmp_path / "run", [*staged_overrides(root), *plan, *start]))
    assert "selflabel/test/acc" in metrics
    said = "has no weights of task(s) rotation" if "rotation" in plan[0] else "task(s) contrastive are not"
    assert said in caplog.text
    ours = torch.load(tmp_path / "run" / "checkpoints" / "selflabel" / "last.ckpt", weights_only=True)
    theirs = torch.load(scan, weights_only=True)
    # refresh=never: the stage trains on the neighbours the checkpoint's run mined
    assert torch.equal(ours["task_states"]["scan"]["neighbours"], theirs["task_states"]["scan"]["neighbours"])


def test_a_fresh_task_keeps_its_initial_weights_and_a_shared_one_takes_the_checkpoints(staged, tmp_path):
    from mtl_unsup.build import build_model
    from mtl_unsup.errors import CheckpointError

    root, run, _, _ = staged
    ckpt = torch.load(run / "checkpoints" / "scan" / "last.ckpt", weights_only=True)
    cfg = compose_cfg(tmp_path, [*staged_overrides(root), "task=[contrastive,scan,selflabel,rotation]",
                                 "+stages.selflabel.tasks.rotation={}"])
    _, module = build_model(cfg, staged=True)
    built = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_weights(ckpt, "ckpt", other_tasks=True)
    for key, value in module.state_dict().items():
        expected = built[key] if key.startswith("tasks.rotation.") else ckpt["state_dict"][key]
        assert torch.equal(value, expected), key
    # a task both hold that lacks part of its weights is not taken as fresh
    partial = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items()
                                      if not k.startswith("tasks.scan.heads.1.")}}
    with pytest.raises(CheckpointError, match=r"2 missing \(e\.g\. tasks\.scan\.heads\.1\.weight"):
        module.load_weights(partial, "ckpt", other_tasks=True)


def test_a_task_both_hold_must_still_fit(staged, tmp_path):
    from mtl_unsup.errors import CheckpointError

    root, run, _, _ = staged
    scan = run / "checkpoints" / "scan" / "last.ckpt"
    cfg = compose_cfg(tmp_path / "run", [*staged_overrides(root), "task.scan.num_heads=3",
                                         "start_stage=selflabel", f"ckpt_path={scan}"])
    with pytest.raises(CheckpointError, match=r"does not fit this model.*tasks\.scan\.heads\.2"):
        train(cfg)


def test_no_stage_reads_labels(staged, tmp_path, monkeypatch):
    root, _, _, _ = staged
    overrides = [*staged_overrides(root), "trainer.deterministic=true"]
    plain = train(compose_cfg(tmp_path / "a", overrides))
    permute_labels(monkeypatch)
    shuffled = train(compose_cfg(tmp_path / "b", overrides))
    for stage in STAGES:
        losses = [[json.loads(line)["train/loss"] for line in (tmp_path / d / stage / "epochs.jsonl")
                   .read_text().splitlines()] for d in ("a", "b")]
        assert losses[0] == losses[1], stage
    assert {k: v for k, v in plain.items() if "silhouette" in k} == \
        {k: v for k, v in shuffled.items() if "silhouette" in k}
    assert plain["test/acc"] != shuffled["test/acc"] or plain["test/nmi"] != shuffled["test/nmi"]


def test_debug_fdr_runs_every_stage_of_an_experiment_for_one_batch(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            folder = tmp_path / "rgb" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(12):
                pixels = torch.randint(0, 60, (16, 16, 3), dtype=torch.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    overrides = ["experiment=scan_cifar10", f"data.root={tmp_path / 'rgb'}", "debug=fdr",
                 "backbone=small_cnn", "backbone.widths=[8,16]",
                 "data.image_size=16", "cluster.k=2", "cluster.pca_dim=4", "task.scan.num_neighbors=3",
                 "print_config=false"]
    cfg = compose_cfg(tmp_path / "run", overrides)
    assert cfg.trainer.fast_dev_run and list(cfg.stages) == list(STAGES)
    train(cfg)
    for stage in STAGES:
        rows = (tmp_path / "run" / stage / "epochs.jsonl").read_text().splitlines()
        assert len(rows) == 1 and json.loads(rows[0])["step"] == 1, stage


@pytest.mark.parametrize(("override", "says"), [
    ("+stages.scan.epoch=3", "stages.scan.epoch is not a stage setting"),
    ("stages.scan.epochs=0", "stages.scan.epochs=0: give the stage's number of epochs"),
    ("+stages.scan.tasks.rotation={}", "stages.scan.tasks.rotation is not in the run's task list"),
    ("+stages.scan.tasks.scan.num_heads=3", "stages.scan.tasks.scan.num_heads cannot be set per stage"),
    ("stages.scan.refresh=sometimes", "stages.scan.refresh='sometimes': use every, once, never"),
    ("+stages.scan.backbone_lr=-1", "stages.scan.backbone_lr=-1"),
    ("start_stage=scna", "start_stage='scna' is not a stage of this run"),
    ("start_stage=scan", "start_stage=scan starts from the model the stage before it left: give"),
    ("+stages.selflabel.optimizer={lr: 0.1}", "stages.selflabel.optimizer has no _target_"),
    ("max_stage_epochs=0", "max_stage_epochs=0: must be >= 1"),
])
def test_stage_mistakes_stop_before_any_image_is_read_naming_the_key(tmp_path, override, says):
    from mtl_unsup.config import check_config

    cfg = compose_cfg(tmp_path, [*staged_overrides(tmp_path / "nowhere"), override])
    with pytest.raises(ConfigValueError, match=says.replace("(", r"\(")):
        check_config(cfg)


def test_a_checkpoint_monitor_a_stage_never_logs_is_named_before_training(staged, tmp_path):
    root, _, _, _ = staged
    overrides = [*staged_overrides(root), "checkpoint.monitor=train/loss_scan", "checkpoint.mode=min"]
    with pytest.raises(ConfigValueError, match="checkpoint.monitor=train/loss_scan is not a metric"):
        train(compose_cfg(tmp_path, overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_a_stage_that_keeps_targets_no_stage_made_says_so(staged, tmp_path):
    root, _, _, _ = staged
    overrides = [*staged_overrides(root), "stages.scan.refresh=never"]
    with pytest.raises(ConfigValueError, match="trains task scan with refresh=never, but no earlier stage"):
        train(compose_cfg(tmp_path, overrides))


def test_a_scan_head_that_collapsed_is_no_answer_one_that_differs_from_kmeans_is():
    from mtl_unsup.clustering.refresh import RefreshContext
    from mtl_unsup.clustering.settings import ClusterSettings

    features = torch.randn(60, 8)
    ctx = RefreshContext(features, epoch=0, seed=0, settings=ClusterSettings(pca_dim=None), k=3)
    task = ScanTask(num_neighbors=3)
    task.build(8, 3)
    task.trained_steps += 1
    with torch.no_grad():  # clusters by the sign of two features: balanced, unlike k-means'
        task.heads[0].weight.zero_()
        task.heads[0].bias.zero_()
        task.heads[0].weight[0, 0], task.heads[0].weight[1, 1] = 10.0, 10.0
    assert task.finish(ctx, None) is None
    with torch.no_grad():
        task.heads[0].weight.zero_()
        task.heads[0].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # one cluster for every image
    state, why = task.finish(ctx, None)
    assert not state["usable"] and "collapsed" in why and "1 of 3 clusters in use" in why


@pytest.mark.slow
def test_neighbours_mined_once_under_ddp_are_those_of_one_process(staged, tmp_path):
    root, run, _, _ = staged
    start = ["start_stage=scan", f"ckpt_path={run / 'checkpoints' / 'pretext' / 'last.ckpt'}", "~logger"]
    two = run_script(tmp_path / "two", 0, root, *start, "trainer=ddp", "trainer.accelerator=cpu",
                     "trainer.devices=2", "data.batch_size=8", "stages.scan.batch_size=4")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("stage 2 of 3: scan (") == 1  # rank 0 speaks, once
    one = run_script(tmp_path / "one", 0, root, *start)
    assert one.returncode == 0, one.stderr[-3000:]
    mined = [torch.load(tmp_path / d / f"neighbours_rank{r}_of{n}.pt", weights_only=True)
             for d, r, n in (("two", 0, 2), ("two", 1, 2), ("one", 0, 1))]
    assert torch.equal(mined[0], mined[1]) and torch.equal(mined[0], mined[2])
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["scan/test/acc"] >= 0


def test_the_runs_max_time_is_shared_by_its_stages(tmp_path):
    import time

    from mtl_unsup.staged import cap_stage_time
    from mtl_unsup.stages import plan_stages

    cfg = compose_cfg(tmp_path, [*staged_overrides(tmp_path), "+stages.scan.max_time=00:00:01:00",
                                 "trainer.max_time=00:00:10:00"])
    pretext, scan, selflabel = plan_stages(cfg)
    assert pretext.cfg.trainer.max_time is None and scan.cfg.trainer.max_time == "00:00:01:00"
    cap_stage_time(pretext, time.monotonic() - 300, 600, None)  # 5 minutes of the run's 10 are left
    cap_stage_time(scan, time.monotonic() - 300, 600, None)  # its own minute is less
    assert pretext.cfg.trainer.max_time in ("00:00:04:59", "00:00:05:00")
    assert scan.cfg.trainer.max_time == "00:00:01:00"
    cap_stage_time(selflabel, time.monotonic(), 600, 0.3)  # its share: 3 of the 10 minutes
    assert selflabel.cfg.trainer.max_time == "00:00:03:00"


def test_a_stage_resumed_inside_counts_the_time_its_checkpoint_had_trained(tmp_path):
    import time

    from mtl_unsup.staged import cap_stage_time, trained_seconds
    from mtl_unsup.stages import plan_stages

    timed = {"callbacks": {"Timer": {"time_elapsed": {"train": 240.0, "validate": 9.0}}}}
    assert trained_seconds(timed) == 240.0 and trained_seconds({"callbacks": {}}) == 0.0
    cfg = compose_cfg(tmp_path, [*staged_overrides(tmp_path), "trainer.max_time=00:00:10:00"])
    pretext = plan_stages(cfg)[0]
    # the run started (in an earlier process) 240 s before now, all of them spent in this stage:
    # Lightning's Timer restores the 240 s, so the stage's cap is the budget, 600 s, not 360
    cap_stage_time(pretext, time.monotonic() - 240, 600, None, trained=240.0)
    assert pretext.cfg.trainer.max_time in ("00:00:09:59", "00:00:10:00")
    cap_stage_time(pretext, time.monotonic() - 240, 600, 0.5, trained=240.0)
    assert pretext.cfg.trainer.max_time == "00:00:05:00"  # its share counts the Timer's total
    bad = compose_cfg(tmp_path, [*staged_overrides(tmp_path), "+stages.scan.max_time=90min"])
    from mtl_unsup.config import check_config

    with pytest.raises(ConfigValueError, match=r"stages.scan.max_time='90min': use DD:HH:MM:SS"):
        check_config(bad)
    bad = compose_cfg(tmp_path, [*staged_overrides(tmp_path), "+stages.scan.time_share=1.5"])
    with pytest.raises(ConfigValueError, match=r"stages.scan.time_share=1.5: the largest share"):
        check_config(bad)


@pytest.mark.parametrize("name", ["scan_cifar10", "scan_cifar10_cpu", "scan_fashion_mnist", "scan_mnist"])
def test_each_staged_experiment_composes_into_stages_that_build(tmp_path, name):
    from hydra.utils import instantiate

    from mtl_unsup.config import check_config
    from mtl_unsup.stages import as_timedelta, plan_stages
    from mtl_unsup.train import build_tasks

    cfg = compose_cfg(tmp_path, [f"experiment={name}", "data.root=/nowhere"])
    check_config(cfg)
    build_tasks(cfg)
    plan = plan_stages(cfg)
    # scan_cifar10_cpu leaves self-labelling out (stages: {selflabel: null}; it cost ACC there)
    kept = 2 if name == "scan_cifar10_cpu" else len(STAGES)
    assert [s.name for s in plan] == list(STAGES[:kept])
    assert [s.refresh for s in plan] == ["every", "once", "never"][:kept]
    for stage in plan:
        instantiate(stage.cfg.optimizer)
        if stage.cfg.scheduler:  # the cosine schedule spans the stage's own epochs
            assert stage.cfg.scheduler.T_max == stage.cfg.trainer.max_epochs
    if kept == 3:
        assert plan[2].settings["selflabel"].get("weak_view", cfg.task.selflabel.weak_view) == "plain"
        # on 28-px grey images self-labelling alone collapsed: SCAN and the pretext stay beside it
        kept_beside = {"scan", "rotation", "contrastive"} if name != "scan_cifar10" else set()
        assert set(plan[2].weights) == {"selflabel", *kept_beside}
    budget = as_timedelta(cfg.trainer.max_time)
    if budget is not None:  # a CPU-sized protocol: the stages' caps fit the run's budget
        assert sum((as_timedelta(s.cfg.trainer.max_time) for s in plan), start=budget * 0) <= budget


def test_a_stage_set_to_null_is_left_out_and_cannot_be_started_from(tmp_path):
    from mtl_unsup.config import check_config
    from mtl_unsup.stages import plan_stages

    cfg = compose_cfg(tmp_path, [*staged_overrides(tmp_path), "stages.selflabel=null"])
    check_config(cfg)
    assert [s.name for s in plan_stages(cfg)] == ["pretext", "scan"]
    start = compose_cfg(tmp_path, [*staged_overrides(tmp_path), "stages.scan=null", "start_stage=scan",
                                   "ckpt_path=elsewhere.ckpt"])
    with pytest.raises(ConfigValueError, match=r"start_stage='scan' is not a stage of this run"):
        check_config(start)


class Budgets(L.Callback):
    """The time limit each stage's trainer got, in seconds."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_fit_start(self, trainer, module) -> None:
        from lightning.pytorch.callbacks import Timer

        self.seconds += [c._duration for c in trainer.callbacks if isinstance(c, Timer)]


@pytest.mark.parametrize("planned", [True, False])
def test_a_staged_run_within_a_time_budget_runs_every_stage(staged, tmp_path, planned):
    root, _, _, _ = staged
    overrides = [*staged_overrides(root), "trainer.max_time={minutes: 10}",
                 "+stages.scan.max_time=00:00:05:00", "+stages.pretext.time_share=0.25"]
    budgets = Budgets()
    # the debug presets' epoch cap is one reason a run is not planned: then the caps alone hold
    unplanned = [] if planned else ["max_stage_epochs=2"]
    metrics = train(compose_cfg(tmp_path, [*overrides, *unplanned]), extra_callbacks=(budgets,))
    assert all(f"{stage}/test/kmeans_acc" in metrics for stage in STAGES)
    assert (tmp_path / "plan.json").is_file() == planned
    pretext, scan, selflabel = budgets.seconds
    assert scan == 300  # its own cap
    if planned:  # its share limits its planned epochs (all 2 fit); its cap guards the budget
        assert 500 < pretext <= 600
    else:  # its share of the 10 minutes
        assert pretext == 150
    assert 240 < selflabel < 600  # what the run has left


@pytest.mark.parametrize(("override", "says"), [
    ("+stages.pretext.tasks.contrastive.weak_view=plain", "stages.pretext.tasks.contrastive.weak_view: task "
     "contrastive has no setting weak_view"),
    ("+stages.selflabel.tasks.selflabel.weak_view=sharp", "stages.selflabel.tasks.selflabel reads the view "
     "'sharp', which is not in data.augmentations"),
])
def test_a_later_stages_mistake_stops_the_run_before_any_stage_trains(staged, tmp_path, override, says):
    root, _, _, _ = staged
    with pytest.raises(ConfigValueError, match=says):
        train(compose_cfg(tmp_path, [*staged_overrides(root), override]))
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_killed_after_its_last_stage_writes_its_results_on_resume(staged, tmp_path, capsys):
    import shutil

    root, run, metrics, _ = staged
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / "metrics.json").unlink()  # killed between the last stage and the results
    again = train(compose_cfg(tmp_path / "run", [*staged_overrides(root), "resume=true"]))
    assert again == pytest.approx(metrics)
    chosen = [c for c in json.loads((run / "candidates.json").read_text())["candidates"] if c["chosen"]]
    said = "k-means of the features" if chosen[0]["name"] == "kmeans" else f"{chosen[0]['name']} "
    assert f"answer:     {said}" in capsys.readouterr().out  # the chosen model, loaded
    with pytest.raises(ConfigValueError, match="Every stage of the run in .* is done"):
        train(compose_cfg(tmp_path / "run", [*staged_overrides(root), "resume=true"]))


def test_resume_true_with_another_runs_checkpoint_starts_from_its_weights(staged, tmp_path):
    root, run, _, _ = staged
    pretext = run / "checkpoints" / "pretext" / "last.ckpt"
    metrics = train(compose_cfg(tmp_path / "b", [*staged_overrides(root), "start_stage=scan",
                                                 f"ckpt_path={pretext}", "resume=true"]))
    mined = [torch.load(d / "checkpoints" / "scan" / "last.ckpt", weights_only=True)["task_states"]["scan"]
             for d in (run, tmp_path / "b")]
    assert torch.equal(mined[0]["neighbours"], mined[1]["neighbours"]) and "pretext/test/acc" not in metrics


class Interrupted(Exception):
    pass


class KillInStage(L.Callback):
    """Raises inside a stage's second epoch, after its checkpoint of step 6 (an interrupted run)."""

    def __init__(self, stage: int) -> None:
        self.stage = stage

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if module.stage_index == self.stage and trainer.global_step == 7:
            raise Interrupted


def test_a_stage_that_keeps_its_targets_resumes_inside_itself(staged, tmp_path):
    root, _, _, _ = staged
    # a k-means-target stage, then a fine-tuning stage on the same targets, interrupted inside it
    overrides = [*tiny_folder_overrides(root), "task=[contrastive,cluster]",
                 "checkpoint.every_n_train_steps=3", "data.batch_size=8",
                 "+stages.kmeans.tasks={cluster: {}, contrastive: {}}", "+stages.kmeans.epochs=2",
                 "+stages.tune.tasks.cluster={}", "+stages.tune.epochs=2", "+stages.tune.refresh=never"]
    with pytest.raises(Interrupted):
        train(compose_cfg(tmp_path, overrides), extra_callbacks=(KillInStage(1),))
    assert torch.load(tmp_path / "checkpoints" / "tune" / "last.ckpt", weights_only=True)["global_step"] == 6
    metrics = train(compose_cfg(tmp_path, [*overrides, "resume=true"]))
    assert "tune/test/acc" in metrics and "kmeans/test/acc" in metrics


def test_debug_presets_cap_every_stage(tmp_path):
    from mtl_unsup.stages import plan_stages

    cfg = compose_cfg(tmp_path, ["experiment=scan_cifar10", "data.root=/nowhere", "debug=limit"])
    assert [s.cfg.trainer.max_epochs for s in plan_stages(cfg)] == [3, 3, 3]


def test_self_labelling_that_collapses_the_scan_head_is_caught(staged, tmp_path):
    root, _, _, _ = staged

    class Collapse(L.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            if module.stage_index == 2 and trainer.current_epoch == trainer.max_epochs - 1:
                with torch.no_grad():
                    for head in module.tasks["scan"].heads:
                        head.weight.zero_()
                        head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))

    train(compose_cfg(tmp_path, staged_overrides(root)), extra_callbacks=(Collapse(),))
    last = torch.load(tmp_path / "checkpoints" / "selflabel" / "last.ckpt", weights_only=True)
    assert last["answer"] == "kmeans" and not last["task_states"]["scan"]["usable"]
