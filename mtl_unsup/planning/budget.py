"""A budget is a plan: each stage's epochs sized so that its schedule runs to its end in time.

Given ``trainer.max_time``, the run measures what each stage costs on this machine
(:mod:`mtl_unsup.planning.probe`: a training step at the stage's batch size and views, a refresh of its
targets, a validation, the clustering and test at its end, the report), then gives every stage as
many whole epochs as fit its part of the time left, at most the epochs its config asks for. A
stage's scheduler is sized by its epochs (``T_max: ${trainer.max_epochs}``), so a cosine schedule
ends at its final learning rate instead of being cut where it stands. Without a budget the plan
is the config's epochs, and its estimate is printed before training.

How the time is shared: what is fixed (each stage's start and end, the report) comes off first;
the rest goes to the stages in proportion to what their full schedules would take (the
protocol's own ratio), a stage with ``time_share`` taking at most that share of it, what a capped
stage leaves going to the others. After each stage, the stages left are planned again from the
time really left, their costs scaled by how the finished stages' speed compared with the probe's.

Nothing here loads torch: the costs come in as numbers.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtl_unsup.errors import UserError

PLAN_FILE = "plan.json"
# The plan fills this share of the time left, keeping the rest against the probe's error.
FILL = 0.93


class BudgetError(UserError, ValueError):
    """A ``trainer.max_time`` too short for one epoch of every stage."""


def process_age() -> float:
    """Seconds since this process started (0 where /proc is missing)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_command_start: float | None = None
_run_start = time.monotonic()


def mark_command_start() -> None:
    """The command's process started the run (``mtl-train``): its start-up counts."""
    global _command_start
    _command_start = time.monotonic() - process_age()


def begin_run() -> None:
    """A run starts now, or where :func:`mark_command_start` said (once)."""
    global _command_start, _run_start
    _run_start = _command_start if _command_start is not None else time.monotonic()
    _command_start = None


def run_seconds() -> float:
    """Seconds since the run began: a budget counts its whole wall time, start-up included."""
    return time.monotonic() - _run_start


@dataclass
class StageCost:
    """What one stage costs on this machine, in seconds (measured by the probe).

    Attributes:
        name: the stage's name.
        step: one training step at the stage's batch size and views.
        steps_per_epoch: its training steps in one epoch.
        refresh: one refresh of its dataset-level targets (a feature pass and k-means or mining).
        refreshes_per_epoch: how many of them an epoch brings on average (0: none after the start).
        start: what the stage does once when it starts (a refresh ``once``).
        validation: one validation; ``validations_per_epoch``: how often it comes.
        end: the final clustering, the last checkpoint and the test at the stage's end.
        overhead: what an epoch costs beyond its steps (the loops, the loader, checkpoints).
    """

    name: str
    step: float
    steps_per_epoch: int
    refresh: float = 0.0
    refreshes_per_epoch: float = 0.0
    start: float = 0.0
    validation: float = 0.0
    validations_per_epoch: float = 0.0
    end: float = 0.0
    overhead: float = 0.0

    @property
    def epoch(self) -> float:
        """One epoch: its steps, its share of refreshes and validations, its overhead."""
        return (self.step * self.steps_per_epoch + self.refresh * self.refreshes_per_epoch
                + self.validation * self.validations_per_epoch + self.overhead)

    def seconds(self, epochs: int) -> float:
        return self.start + epochs * self.epoch + self.end

    def scaled(self, speed: float) -> StageCost:
        """The same stage on a machine ``speed`` times slower (2: twice the time)."""
        return StageCost(self.name, self.step * speed, self.steps_per_epoch, self.refresh * speed,
                         self.refreshes_per_epoch, self.start * speed, self.validation * speed,
                         self.validations_per_epoch, self.end * speed, self.overhead * speed)


@dataclass
class StagePlan:
    """One stage's part of the plan, and what it really did (``actual_*``, once done)."""

    name: str
    epochs: int
    asked: int
    seconds: float
    epoch_seconds: float
    share: float | None = None
    actual_epochs: int | None = None
    actual_seconds: float | None = None


@dataclass
class Plan:
    """The run's plan: its budget (None: none), the fixed costs, the stages, and what happened."""

    budget: float | None
    spent: float  # seconds of the command spent before the plan (start-up, decoding, probe)
    report: float  # the report and pictures at the end
    stages: list[StagePlan]
    probe_seconds: float = 0.0
    replans: list[dict] = field(default_factory=list)
    total_seconds: float | None = None  # the whole command, measured at its end

    @property
    def estimate(self) -> float:
        """The whole command's estimated seconds, from its start (a finished stage counts what
        it took)."""
        return self.spent + sum(s.seconds if s.actual_seconds is None else s.actual_seconds
                                for s in self.stages) + self.report

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def fair_split(wanted: list[float], caps: list[float], available: float) -> list[float]:
    """Seconds for each stage: in proportion to ``wanted``, none above its cap, summing to at
    most ``available`` (water-filling: what a capped stage cannot take goes to the others)."""
    limits = [min(w, c) for w, c in zip(wanted, caps, strict=True)]
    if sum(limits) <= available:
        return limits
    out = [0.0] * len(wanted)
    free = [i for i in range(len(wanted)) if limits[i] > 0]
    left = available
    while free:
        scale = left / sum(wanted[i] for i in free)
        capped = [i for i in free if wanted[i] * scale >= limits[i]]
        if not capped:
            for i in free:
                out[i] = wanted[i] * scale
            break
        for i in capped:
            out[i] = limits[i]
            left -= limits[i]
        free = [i for i in free if i not in capped]
    return out


def allocate(costs: list[StageCost], asked: list[int], shares: list[float | None],
             available: float | None) -> list[StagePlan]:
    """Each stage's epochs: ``asked`` without a budget (``available`` None), else as many whole
    epochs as its part of ``available`` seconds holds (at least 1, at most ``asked``)."""
    if available is None:
        return [StagePlan(c.name, a, a, c.seconds(a), c.epoch, s)
                for c, a, s in zip(costs, asked, shares, strict=True)]
    training = available - sum(c.start + c.end for c in costs)
    least = sum(c.epoch for c in costs)
    if training < least:
        raise BudgetError(
            f"{'These stages need' if len(costs) > 1 else 'This run needs'} about "
            f"{minutes(sum(c.seconds(1) for c in costs))} for one epoch"
            f"{' each' if len(costs) > 1 else ''} on this machine, and the budget leaves "
            f"{minutes(max(0.0, available))}")
    # one epoch each first; the rest in proportion to the epochs each still asks for
    wanted = [(a - 1) * c.epoch for c, a in zip(costs, asked, strict=True)]
    caps = [math.inf if s is None else max(0.0, s * training - c.epoch)
            for s, c in zip(shares, costs, strict=True)]
    seconds = fair_split(wanted, caps, training - least)
    plans = []
    for cost, want, got, share in zip(costs, asked, seconds, shares, strict=True):
        epochs = min(want, 1 + (int(got / cost.epoch) if cost.epoch > 0 else want))
        plans.append(StagePlan(cost.name, epochs, want, cost.seconds(epochs), cost.epoch, share))
    return plans


def allocate_at_least(costs: list[StageCost], asked: list[int], shares: list[float | None],
                      available: float | None, keep_first: bool = False) -> list[StagePlan]:
    """:func:`allocate`, or where ``available`` holds less than one epoch of each stage (a run
    already under way), each stage a single epoch; ``keep_first``: the first keeps its epochs
    asked (a stage resumed inside, whose schedule was sized by them)."""
    try:
        return allocate(costs, asked, shares, available)
    except BudgetError:
        least = [asked[0] if keep_first else 1, *[1] * (len(asked) - 1)]
        stages = allocate(costs, least, shares, None)
        for s, want in zip(stages, asked, strict=True):
            s.asked = want
        return stages


def make_plan(costs: list[StageCost], asked: list[int], shares: list[float | None],
              budget: float | None, spent: float, report: float, probe_seconds: float = 0.0,
              at_least: bool = False) -> Plan:
    """The run's plan, ``spent`` seconds into a command whose budget is ``budget`` seconds;
    ``at_least``: a run under way, which never stops for want of time (:func:`allocate_at_least`)."""
    available = None if budget is None else (budget - spent - report) * FILL
    if at_least:
        stages = allocate_at_least(costs, asked, shares, available, keep_first=True)
        return Plan(budget, spent, report, stages, probe_seconds)
    try:
        stages = allocate(costs, asked, shares, available)
    except BudgetError as err:
        raise BudgetError(f"trainer.max_time={hms(budget)} is too short: {err}, after "
                          f"{minutes(spent)} of start-up and {minutes(report)} for the report. "
                          "Give a longer trainer.max_time, or fewer or smaller images (data.limit, "
                          "data.image_size).") from None
    return Plan(budget, spent, report, stages, probe_seconds)


def replan(plan: Plan, costs: list[StageCost], shares: list[float | None], first: int,
           elapsed: float, speed: float) -> None:
    """Plan the stages from ``first`` on again, ``elapsed`` seconds into the command, their costs
    scaled by ``speed`` (measured / estimated of the stages done); a budget that no longer holds
    one epoch of each gives each one epoch."""
    if plan.budget is None or first >= len(plan.stages):
        return
    rest = [c.scaled(speed) for c in costs[first:]]
    asked = [s.asked for s in plan.stages[first:]]
    available = (plan.budget - elapsed - plan.report * speed) * FILL
    stages = allocate_at_least(rest, asked, shares[first:], available)
    plan.replans.append({"before": plan.stages[first].name, "elapsed": round(elapsed, 1),
                         "speed": round(speed, 3), "epochs": [s.epochs for s in stages]})
    plan.stages[first:] = stages


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    s = int(round(seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def describe(plan: Plan, machine: str) -> str:
    """The plan as printed before training: each stage's epochs and minutes, and the total."""
    head = (f"plan for trainer.max_time={hms(plan.budget)} on {machine}" if plan.budget is not None
            else f"plan (no trainer.max_time) on {machine}")
    lines = [f"{head}, measured in a {plan.probe_seconds:.0f} s probe:"]
    for s in plan.stages:
        cut = "" if s.epochs == s.asked else f" of {s.asked} asked"
        share = f", at most {s.share:.0%} of the training time" if s.share is not None and plan.budget else ""
        lines.append(f"  {s.name or 'training'}: {s.epochs} epochs{cut} ({s.epoch_seconds:.1f} s each), "
                     f"{minutes(s.seconds)}{share}")
    lines.append(f"  start-up {minutes(plan.spent)}, report {minutes(plan.report)}: "
                 f"about {minutes(plan.estimate)} in all"
                 + ("" if plan.budget is None else f" of the {minutes(plan.budget)} budget"))
    return "\n".join(lines)


def write_plan(path: Path, plan: Plan) -> None:
    """``plan.json``: the plan, its re-plans and, as stages end, what they really did."""
    from mtl_unsup.atomic import write_text

    data = asdict(plan)
    data["estimate"] = plan.estimate
    for s in data["stages"]:
        for key in ("seconds", "epoch_seconds", "actual_seconds"):
            if s[key] is not None:
                s[key] = round(s[key], 1)
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_plan(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
