"""A budget is a plan: the probe measures, the plan sizes every stage's epochs so that each
schedule runs to its end, a one-stage run takes the same path, and a budget too short stops
before any training."""

import json
import math

import lightning as L
import pytest

from mtl_unsup.planning.budget import BudgetError, StageCost, allocate, fair_split, make_plan, replan
from mtl_unsup.train import train

from .conftest import compose_cfg, staged_overrides, tiny_folder_overrides


def cost(name: str, epoch: float, start: float = 0.0, end: float = 0.0) -> StageCost:
    return StageCost(name, step=epoch / 10, steps_per_epoch=10, start=start, end=end)


def test_without_a_budget_every_stage_gets_the_epochs_it_asks_for():
    plans = allocate([cost("a", 2.0, end=5.0), cost("b", 1.0)], [30, 10], [None, None], None)
    assert [p.epochs for p in plans] == [30, 10]
    assert plans[0].seconds == pytest.approx(65.0) and plans[1].seconds == pytest.approx(10.0)


def test_a_budget_that_holds_the_whole_protocol_cuts_nothing():
    plans = allocate([cost("a", 2.0), cost("b", 1.0)], [30, 10], [0.7, None], 1000.0)
    assert [p.epochs for p in plans] == [30, 10]


def test_a_short_budget_shares_the_time_in_the_protocols_own_ratio_minus_fixed_costs():
    # full schedules: 200 s and 100 s; 120 s left after the fixed 30 s: 80 and 40
    plans = allocate([cost("a", 2.0, start=10.0), cost("b", 1.0, end=20.0)], [100, 100], [None, None], 150.0)
    assert [p.epochs for p in plans] == [40, 40]
    assert sum(p.seconds for p in plans) <= 150.0


def test_a_stage_share_caps_it_and_the_others_take_what_it_leaves():
    assert fair_split([300.0, 100.0], [60.0, math.inf], 100.0) == [60.0, 40.0]
    assert fair_split([300.0, 100.0], [math.inf, 20.0], 100.0) == [80.0, 20.0]
    assert fair_split([300.0, 100.0], [math.inf, 30.0], 100.0) == [75.0, 25.0]  # no cap binds
    assert fair_split([10.0, 10.0], [math.inf, math.inf], 100.0) == [10.0, 10.0]  # all fits
    plans = allocate([cost("pretext", 1.0), cost("scan", 1.0)], [500, 200], [0.5, None], 100.0)
    assert [p.epochs for p in plans] == [50, 50]


def test_a_budget_too_short_for_one_epoch_each_names_the_key_and_the_time_needed():
    with pytest.raises(BudgetError, match=r"trainer.max_time=0:00:30 is too short: These stages need about "
                                          r"1.0 min for one epoch each"):
        make_plan([cost("a", 20.0), cost("b", 40.0)], [5, 5], [None, None], 30.0, spent=5.0, report=2.0)


def test_replanning_scales_the_later_stages_by_the_speed_the_earlier_ones_had():
    costs = [cost("a", 1.0), cost("b", 1.0)]
    plan = make_plan(costs, [1000, 1000], [None, None], budget=220.0, spent=0.0, report=0.0)
    first = plan.stages[1].epochs
    replan(plan, costs, [None, None], 1, elapsed=110.0, speed=2.0)  # twice as slow as probed
    assert plan.stages[1].epochs == pytest.approx(first / 2, abs=2)
    assert plan.replans[0]["before"] == "b" and plan.replans[0]["speed"] == 2.0


class Rates(L.Callback):
    """The learning rate and the active tasks of each epoch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.active: list[list[str]] = []
        self.t_max: list[int] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.active.append([n for n in module.tasks if module.task_active(n, trainer.current_epoch)])

    def on_train_end(self, trainer, module) -> None:
        self.t_max.append(trainer.lr_scheduler_configs[0].scheduler.T_max)


def budget_overrides(base: list[str]) -> list[str]:
    return [*base, "estimate=true", "trainer.max_time=00:00:00:15"]


def test_a_one_stage_run_within_a_budget_is_planned_and_its_schedule_ends(shapes_dir, tmp_path, capsys):
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=100000",
                 "task.cluster.start_epoch=50000", "trainer.check_val_every_n_epoch=1000"]
    rates = Rates()
    train(compose_cfg(tmp_path, budget_overrides(overrides)), extra_callbacks=(rates,))
    plan = json.loads((tmp_path / "plan.json").read_text())
    [stage] = plan["stages"]
    assert stage["name"] == "" and stage["asked"] == 100000 and 1 <= stage["epochs"] < 100000
    epochs = stage["epochs"]
    assert rates.t_max == [epochs]  # the cosine schedule spans the epochs planned
    assert all(a >= b for a, b in zip(rates.lrs, rates.lrs[1:], strict=False))
    # (a machine much slower than at the probe leaves the run's time cap to stop it: then not all)
    assert stage["actual_epochs"] == len(rates.lrs) <= epochs
    if stage["actual_epochs"] == epochs:  # ...and ends at its final rate, not cut where it stood
        last = 0.002 * 0.5 * (1 + math.cos(math.pi * (epochs - 1) / epochs))
        assert rates.lrs[-1] <= 3 * last + 1e-9
    if epochs >= 4:  # the cluster task starts half way, as it was asked to
        assert "cluster" not in rates.active[0] and "cluster" in rates.active[-1]
    assert plan["total_seconds"] is not None and plan["probe_seconds"] > 0
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "plan for trainer.max_time=0:00:15" in out


def test_a_staged_run_takes_the_same_path_and_plans_every_stage(shapes_dir, tmp_path, monkeypatch):
    import mtl_unsup.staged as staged

    calls = []
    original = staged.plan_run
    monkeypatch.setattr(staged, "plan_run", lambda cfg, stages, *a: calls.append([s.name for s in stages])
                        or original(cfg, stages, *a))
    overrides = [*staged_overrides(shapes_dir), "stages.pretext.epochs=100000", "stages.scan.epochs=100000",
                 "stages.selflabel=null", "trainer.check_val_every_n_epoch=1000"]
    metrics = train(compose_cfg(tmp_path / "staged", budget_overrides(overrides)))
    plan = json.loads((tmp_path / "staged" / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]] == ["pretext", "scan"]
    assert all(1 <= s["actual_epochs"] <= s["epochs"] < 100000 for s in plan["stages"])
    assert plan["replans"] and plan["replans"][0]["before"] == "scan"
    assert "scan/test/kmeans_acc" in metrics
    train(compose_cfg(tmp_path / "one", tiny_folder_overrides(shapes_dir)))  # estimate=false, no budget
    assert calls == [["pretext", "scan"], [""]]  # one path for both
    assert not (tmp_path / "one" / "plan.json").exists()


def test_a_budget_too_short_stops_before_training_naming_trainer_max_time(shapes_dir, tmp_path):
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.max_time=00:00:00:01"]
    with pytest.raises(BudgetError, match=r"trainer.max_time=0:00:01 is too short"):
        train(compose_cfg(tmp_path, overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_a_stage_slower_than_planned_is_cut_early_and_its_cosine_still_ends_at_its_final_rate(monkeypatch):
    from types import SimpleNamespace

    import torch

    import mtl_unsup.planning.run as run
    from mtl_unsup.planning.budget import StagePlan

    clock = [0.0]
    monkeypatch.setattr(run.time, "monotonic", lambda: clock[0])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    trainer = SimpleNamespace(current_epoch=0, fit_loop=SimpleNamespace(max_epochs=20), is_global_zero=True,
                              lr_scheduler_configs=[SimpleNamespace(scheduler=cosine)])
    part = StagePlan("pretext", epochs=20, asked=50, seconds=200.0, epoch_seconds=10.0)
    cuts = []
    keeper = run.KeepToPlan(part, deadline=200.0, on_cut=lambda: cuts.append(part.epochs))
    lrs = []
    while trainer.current_epoch < trainer.fit_loop.max_epochs:
        keeper.on_train_epoch_start(trainer, None)
        lrs.append(optimizer.param_groups[0]["lr"])
        clock[0] += 20.0  # every epoch takes twice the planned 10 s
        keeper.on_train_epoch_end(trainer, None)
        optimizer.step()
        cosine.step()
        trainer.current_epoch += 1
    # cut at the first epoch it could judge (the second), to what 200 s hold at 20 s an epoch
    assert cuts == [10] and part.epochs == 10 and trainer.current_epoch == 10 and cosine.T_max == 10
    assert lrs[-1] < 0.03 and all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    # past half way it holds: a late cut would leave the schedule far from its end
    late = run.KeepToPlan(StagePlan("scan", 4, 4, 40.0, 10.0), deadline=0.0)  # already too late
    late._first, late._second = 0, -100.0
    trainer.current_epoch, trainer.fit_loop.max_epochs = 2, 4  # 3 of its 4 epochs done
    late.on_train_epoch_end(trainer, None)
    assert trainer.fit_loop.max_epochs == 4
    trainer.current_epoch = 1  # half of them done: it may still cut
    late.on_train_epoch_end(trainer, None)
    assert trainer.fit_loop.max_epochs == 2


def test_every_stage_gets_its_epoch_before_the_rest_is_shared_so_the_plan_fits():
    # a long cheap stage and a short dear one: one epoch each first (101 s), then the 49 s left
    plans = allocate([cost("a", 1.0), cost("b", 100.0)], [500, 1], [None, None], 150.0)
    assert [p.epochs for p in plans] == [50, 1]
    assert sum(p.seconds for p in plans) <= 150.0


def test_only_a_run_of_one_process_is_planned():
    from omegaconf import OmegaConf

    from mtl_unsup.planning.run import one_process

    def trainer(devices, nodes=1):
        return OmegaConf.create({"devices": devices, "num_nodes": nodes, "accelerator": "cpu"})

    assert all(one_process(trainer(d)) for d in (1, "1", "auto", [0]))
    assert not any(one_process(trainer(d)) for d in (2, "0,1", [0, 1]))
    assert not one_process(trainer(1, nodes=2))
