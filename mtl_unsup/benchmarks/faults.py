"""Benchmark: the faults a cluster and a disk cause, each tried on small runs of the digits, with a
table of what was lost.

    python -m mtl_unsup.benchmarks.faults [--kills 20] [--out outputs/faults]

Every run is ``mtl_unsup.train`` on the bundled digits (a small CNN, 3 epochs, a checkpoint every 5
steps, deterministic), in a process of its own. The faults:

- SIGKILL at random instants (``--kills``), and inside a checkpoint write (half the file written),
  each run then resumed with ``resume=true``;
- SIGTERM at a random step, then resumed;
- a full disk at each kind of write (a checkpoint, ``metrics.json``, a picture), by a writer that
  fails with ENOSPC;
- two commands into one run directory;
- a truncated and a bit-flipped ``last.ckpt``, then resumed;
- a damaged embedding-cache entry, and two jobs sharing one cache started together.

A run "lost work beyond its last completed save" when, resumed, it does not end with the
uninterrupted run's ``metrics.json`` (the runs are deterministic, so any step lost or repeated
wrongly shows), or when a fault left no whole checkpoint behind. The table gives, per fault, the
tries, those runs, the exit statuses seen and the message the user got.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE = ["trainer.max_epochs=3", "backbone.widths=[8,16]", "backbone.convs_per_stage=1",
        "data.batch_size=64", "checkpoint.every_n_train_steps=5", "trainer.deterministic=true",
        "warmup_epochs=1", "pictures=false", "report=false", "print_config=false",
        "trainer.enable_progress_bar=false"]


@dataclass
class Outcome:
    fault: str
    tries: int = 0
    lost: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    messages: list[str] = field(default_factory=list)

    def add(self, status: int | None, lost: bool, message: str = "") -> None:
        self.tries += 1
        self.lost += int(lost)
        self.statuses[status] += 1
        if message and message not in self.messages:
            self.messages.append(message)


# ---------------------------------------------------------------- the child: one run, one fault


def child(spec: dict) -> None:
    """Train with ``spec["overrides"]`` into ``spec["out"]``, with the fault of ``spec["fault"]``."""
    import logging

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the cache's and resume's notes

    from mtl_unsup.config import CONF_DIR
    from mtl_unsup.train import train

    fault, callbacks = spec.get("fault") or {}, ()
    kind = fault.get("kind")
    if kind == "kill_in_save":
        import torch

        real, count = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] == fault["at"]:
                real(obj, f, *args, **kwargs)
                data = Path(f).read_bytes()
                Path(f).write_bytes(data[: len(data) // 2])  # half written, then the kill
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *args, **kwargs)

        torch.save = save
    elif kind == "enospc":
        fail_on(fault["target"], fault.get("at", 1))
    elif kind == "signal":
        import lightning as L

        class SendAt(L.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                if trainer.global_step == fault["step"]:
                    os.kill(os.getpid(), getattr(signal, "SIG" + fault["signal"]))

        callbacks = (SendAt(),)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=spec["overrides"])
    with open_dict(cfg):
        cfg.paths.output_dir = spec["out"]
    from mtl_unsup.cli import exit_2_on_user_errors

    exit_2_on_user_errors(lambda: train(cfg, extra_callbacks=callbacks))()


def fail_on(target: str, at: int) -> None:
    """The ``at``-th write of ``target`` (checkpoint, metrics, picture) fails as a full disk does."""
    import mtl_unsup.atomic as atomic

    real, count = atomic.write_with, [0]

    def write_with(path, write):
        name = Path(path).name
        hit = {"checkpoint": name.endswith(".ckpt"), "metrics": name == "metrics.json",
               "picture": name.endswith(".png")}[target]
        if hit:
            count[0] += 1
            if count[0] == at:
                def half(partial):
                    Path(partial).write_bytes(b"x" * 100)
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(path, half)
        return real(path, write)

    atomic.write_with = write_with
    import mtl_unsup.checkpoint_io
    import mtl_unsup.visualize

    mtl_unsup.checkpoint_io.write_with = write_with
    mtl_unsup.visualize.write_with = write_with


# ---------------------------------------------------------------- the parent


def run(out: Path, overrides: list[str], fault: dict | None = None, wait: bool = True,
        timeout: float = 600) -> subprocess.Popen | subprocess.CompletedProcess:
    spec = json.dumps({"out": str(out), "overrides": [*BASE, *overrides], "fault": fault})
    command = [sys.executable, "-m", "mtl_unsup.benchmarks.faults", "--child", spec]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(text: str, marker: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if marker in line), "")


def same_metrics(out: Path, reference: str) -> bool:
    path = out / "metrics.json"
    return path.is_file() and path.read_text() == reference


def resume(out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return run(out, [*overrides, "resume=true"])


def kills(root: Path, reference: str, seconds: float, tries: int, rng: random.Random) -> list[Outcome]:
    at_random, in_save = Outcome("SIGKILL at a random instant, resumed"), Outcome(
        "SIGKILL inside a checkpoint write, resumed")
    for i in range(tries):
        out = root / f"kill{i}"
        process = run(out, [], wait=False)
        time.sleep(rng.uniform(3.0, max(3.5, seconds - 1.0)))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        done = resume(out, [])
        at_random.add(done.returncode, not same_metrics(out, reference),
                      last_line(done.stderr, "resuming from") or last_line(done.stderr, "error"))
    for i, at in enumerate((2, 4, 6)):
        out = root / f"killsave{i}"
        killed = run(out, [], {"kind": "kill_in_save", "at": at})
        done = resume(out, [])
        lost = killed.returncode != -signal.SIGKILL or not same_metrics(out, reference)
        in_save.add(done.returncode, lost, last_line(done.stderr, "resuming from"))
    return [at_random, in_save]


def sigterms(root: Path, reference: str, rng: random.Random) -> Outcome:
    outcome = Outcome("SIGTERM / SIGINT at a random step, resumed")
    for i, name in enumerate(("TERM", "TERM", "INT")):
        out = root / f"term{i}"
        stopped = run(out, [], {"kind": "signal", "signal": name, "step": rng.randint(2, 40)})
        done = resume(out, [])
        expected = 143 if name == "TERM" else 130
        outcome.add(stopped.returncode, stopped.returncode != expected or not same_metrics(out, reference),
                    last_line(stopped.stderr, "stopped by"))
        outcome.statuses[f"resumed {done.returncode}"] += 1
    return outcome


def disk_full(root: Path) -> Outcome:
    import torch

    from mtl_unsup.integrity import checkpoint_problem

    outcome = Outcome("disk full at a write (checkpoint, metrics.json, picture)")
    for target, extra in (("checkpoint", []), ("metrics", []), ("picture", ["pictures=true"])):
        out = root / f"full-{target}"
        done = run(out, extra, {"kind": "enospc", "target": target, "at": 2 if target == "checkpoint" else 1})
        last = out / "checkpoints" / "last.ckpt"
        whole = last.is_file() and checkpoint_problem(last) is None
        leftovers = [p.name for p in out.rglob(".*part-*")]
        lost = done.returncode != 2 or not whole or bool(leftovers)
        if whole:
            torch.load(last, weights_only=True)
        outcome.add(done.returncode, lost, last_line(done.stderr, "Could not write"))
    return outcome


def two_writers(root: Path) -> Outcome:
    outcome = Outcome("two commands into one run directory")
    out = root / "shared"
    command = [sys.executable, "-m", "mtl_unsup.train", *BASE, f"hydra.run.dir={out}"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / ".lock").is_file() and (out / ".lock").read_text()):
        time.sleep(0.2)
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    first.communicate()
    interleaved = (bool(list((out / "checkpoints").glob("last-v*.ckpt")))
                   or (out / "run_info.resumed-1.json").exists())
    outcome.add(first.returncode, first.returncode != 0 or interleaved)
    outcome.add(second.returncode, second.returncode != 2, last_line(second.stderr, "in use"))
    return outcome


def damaged_checkpoints(root: Path, reference: str) -> Outcome:
    outcome = Outcome("truncated / bit-flipped last.ckpt, resumed")
    for how in ("truncate", "flip"):
        out = root / f"damaged-{how}"
        run(out, [], {"kind": "signal", "signal": "TERM", "step": 17})
        last = out / "checkpoints" / "last.ckpt"
        data = bytearray(last.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0x10
        last.write_bytes(bytes(data))
        done = resume(out, [])
        outcome.add(done.returncode, not same_metrics(out, reference),
                    last_line(done.stderr, "resuming from"))
    return outcome


def caches(root: Path) -> Outcome:
    """A frozen backbone's features are cached: a damaged entry, and two jobs sharing the cache."""
    import torch

    from mtl_unsup.models.backbones import SmallCNN

    outcome = Outcome("damaged cache entry; two jobs sharing one cache")
    weights = root / "frozen.pt"
    torch.manual_seed(0)
    torch.save(SmallCNN(1, (8, 16), convs_per_stage=1).state_dict(), weights)
    frozen = [f"backbone.weights_path={weights}", "backbone.freeze=true", "task=[cluster]",
              f"paths.cache_dir={root / 'cache'}"]
    first = run(root / "cache-first", frozen)
    reference = (root / "cache-first" / "metrics.json").read_text() if first.returncode == 0 else ""
    entry = next((root / "cache").rglob("train*.npy"))
    entry.write_bytes(entry.read_bytes()[:300])
    mended = run(root / "cache-mended", frozen)
    outcome.add(mended.returncode, not same_metrics(root / "cache-mended", reference),
                last_line(mended.stderr, "damaged"))
    shared = [f"paths.cache_dir={root / 'cache2'}"]
    jobs = [run(root / f"cache-job{i}", [*frozen[:-1], *shared], wait=False) for i in range(2)]
    logs = [job.communicate()[1] for job in jobs]
    computed = sum(log.count("Embedding the train images") for log in logs)
    for i, job in enumerate(jobs):
        outcome.add(job.returncode, not same_metrics(root / f"cache-job{i}", reference) or computed != 1)
    return outcome


def table(outcomes: list[Outcome]) -> str:
    lines = ["| fault | tries | runs that lost work beyond the last completed save | exit statuses "
             "| message |", "|---|---|---|---|---|"]
    for o in outcomes:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(o.statuses.items(), key=str))
        message = (o.messages[0] if o.messages else "").replace("|", "\\|")[:160]
        lines.append(f"| {o.fault} | {o.tries} | {o.lost} | {statuses} | {message} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--out", type=Path,
                        default=Path("outputs/faults") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    rng, root = random.Random(args.seed), args.out
    start = time.perf_counter()
    whole = run(root / "uninterrupted", [])
    if whole.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{whole.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    reference = (root / "uninterrupted" / "metrics.json").read_text()
    print(f"uninterrupted run: {seconds:.0f} s; faults go to {root}", flush=True)
    outcomes = [*kills(root, reference, seconds, args.kills, rng), sigterms(root, reference, rng),
                disk_full(root), two_writers(root), damaged_checkpoints(root, reference), caches(root)]
    print(table(outcomes))


if __name__ == "__main__":
    main()
