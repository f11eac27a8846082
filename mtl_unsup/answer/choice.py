"""The run's answer at its end: every stage's candidates kept, scored without labels, one chosen,
and the model made that answer (see :mod:`mtl_unsup.answer.candidates` for the criteria).

Each stage's candidates (its clusters of the training images and its whitened features) are kept
in ``<stage>/candidates.pt`` as it ends, so a resumed run still chooses among the stages an earlier
process finished. When the choice is not the last stage's own answer, the run's metrics are the
chosen candidate's, the report is drawn from its model, and ``checkpoints/answer.ckpt`` is its
stage's checkpoint with the answer written in, for ``mtl-predict`` and the other commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mtl_unsup.answer.candidates import (
    KMEANS,
    Candidate,
    StageClusterings,
    choose,
    flat_metrics,
    read_scores,
    score_candidates,
    stage_clusterings,
    write_candidates,
)
from mtl_unsup.atomic import write_with
from mtl_unsup.inference import load_checkpoint

FILE = "candidates.pt"
ANSWER_CKPT = "answer.ckpt"


def keep_stage(name: str, module: Any, folder: Path | None, pca_dim: int | None) -> StageClusterings | None:
    """The candidates of the stage that just ended (None: no test pass over the training images),
    saved into ``folder`` (None: not saved, a run of one stage)."""
    out = getattr(module, "train_outputs", None)
    if out is None:
        return None
    kept = stage_clusterings(name, module, out, pca_dim)
    module.train_outputs = None
    if folder is not None and rank_zero_only.rank == 0:
        data = {"space": kept.space,
                "candidates": [(c.name, c.clusters, c.last_answer) for c in kept.candidates]}
        write_with(folder / FILE, lambda tmp: torch.save(data, tmp))
    return kept


def load_stage(name: str, folder: Path) -> StageClusterings | None:
    """The candidates an earlier process kept for stage ``name`` (None: none were)."""
    path = folder / FILE
    if not path.is_file():
        return None
    data = torch.load(path, weights_only=True)
    found = [Candidate(name, head, clusters, last) for head, clusters, last in data["candidates"]]
    return StageClusterings(name, data["space"], found)


def criterion_of(cfg: DictConfig) -> str:
    """``cluster.choose``; ``last`` when ``cluster.answer`` names the answer itself."""
    return str(cfg.cluster.get("choose", "last")) if cfg.cluster.answer == "auto" else "last"


def chosen_metrics(chosen: Candidate, stage_metrics: dict[str, float]) -> dict[str, float]:
    """The run's own metrics: its stage's, with ACC/NMI/ARI those of the chosen clustering."""
    out = dict(stage_metrics)
    for key, value in chosen.scores.items():
        out[key] = value
    return out


def settle_answer(cfg: DictConfig, clusterings: list[StageClusterings],
                  done: dict[str, dict[str, float]], module: Any, out_dir: Path,
                  ckpt_dirs: dict[str, Path]) -> tuple[dict[str, float], Path | None]:
    """Choose the answer; returns the run's metrics (those of the chosen stage, the candidates'
    beside them) and ``checkpoints/answer.ckpt`` when the answer is not the last stage's own."""
    if not clusterings or not any(s.candidates for s in clusterings):
        return {}, None
    clusterings = [s for s in clusterings if s.candidates]
    criterion = criterion_of(cfg)
    candidates = score_candidates(clusterings, seed=int(cfg.seed))
    chosen = choose(candidates, criterion)
    for c in candidates:  # read with labels only now, after the choice
        own = next((o.name for o in candidates
                    if o.stage == c.stage and o.last_answer and o.name != KMEANS), None)
        read_scores(c, done.get(c.stage, {}), own)
    if rank_zero_only.rank == 0:
        write_candidates(out_dir / "candidates.json", candidates, chosen, criterion)
    last = clusterings[-1].stage
    if criterion == "last":  # the run's answer as its last stage left it (k-means' scores as its own
        # when k-means answers); every candidate listed beside it
        return {**chosen.scores, **done[last], **flat_metrics(candidates)}, None
    metrics = {**chosen_metrics(chosen, done[chosen.stage]), **flat_metrics(candidates)}
    what = "k-means of the features" if chosen.name == KMEANS else f"the {chosen.name} head"
    where = f" of stage {chosen.stage}" if chosen.stage else ""
    module.chosen_by = (f"The answer is {what}{where}, chosen without labels by {criterion} among "
                        f"{len(candidates)} candidates (candidates.json).")
    if chosen.stage == last and chosen.last_answer:
        return metrics, None
    path = ckpt_dirs[chosen.stage] / "last.ckpt"
    ckpt = load_checkpoint(path, key="ckpt_path")
    if chosen.stage != last:  # the report and the closing lines describe the chosen model
        module.load_weights(ckpt, str(path), other_tasks=True)
    setting = KMEANS if chosen.name == KMEANS else chosen.name
    module.answer_setting = setting
    answer_path = out_dir / "checkpoints" / ANSWER_CKPT
    if rank_zero_only.rank == 0:
        ckpt["answer"] = setting
        for group in ("cluster", "model"):
            if isinstance(ckpt["mtl_config"].get(group), dict):
                ckpt["mtl_config"][group]["answer"] = setting
        write_with(answer_path, lambda tmp: torch.save(ckpt, tmp))
    return metrics, answer_path
