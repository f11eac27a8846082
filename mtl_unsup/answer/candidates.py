"""The run's answer, chosen without labels among every stage's clusterings.

Every stage leaves candidates: each clustering head of ``cluster.k`` clusters that its tasks
trained, and k-means of its final features. A SCAN head can end below k-means of the features it
started from (on a folder of photographs, 0.545 against 0.581), so the last stage's head is not
always the best answer. Each candidate's clusters of the training images are scored by label-free
criteria, and ``cluster.choose`` names the one that picks:

- ``silhouette``: the mean silhouette of its clusters in its own stage's features, whitened as
  k-means sees them;
- ``silhouette_last``: the same in the last stage's features (one space for every candidate);
- ``consensus``: its mean agreement (NMI) with every other candidate;
- ``last``: no choice, the last stage's own answer (its head, else its k-means).

Every criterion of every candidate goes into ``metrics.json`` (``candidates/<stage>/<name>/...``),
with, for reading only where the images have labels, its ACC and NMI; ``candidates.json`` lists
them in order. Nothing here reads a label to choose: the scores are looked up after the choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.clustering import normalized_mutual_info_score

from mtl_unsup.clustering.kmeans import whiten
from mtl_unsup.config import CHOOSE_CRITERIA as CRITERIA
from mtl_unsup.metrics import silhouette

KMEANS = "kmeans"
SPLIT = "train"  # the images every run clusters, labelled or not


@dataclass
class Candidate:
    """One clustering a stage left: its clusters of the training images, by dataset index."""

    stage: str
    name: str  # a head's full name, or ``kmeans``
    clusters: torch.Tensor
    last_answer: bool = False  # the stage's own answer (its head, else its k-means)
    criteria: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # read with labels, after the choice

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}" if self.stage else self.name


@dataclass
class StageClusterings:
    """What one stage left to choose from: its whitened training features and its candidates."""

    stage: str
    space: torch.Tensor
    candidates: list[Candidate]


def trained_heads(module: Any, k: int) -> list[str]:
    """The clustering heads of ``k`` clusters that the stage's tasks trained (or set)."""
    trained = {n for n in module.tasks if module.task_weight(n) > 0}
    trained |= {h for n in trained for h in module.tasks[n].trains_heads_of()}
    return [head for head, (task, _, size) in module.heads.items()
            if task in trained and size == k and module.tasks[task].answer_ready()]


def stage_clusterings(stage: str, module: Any, out: dict[str, torch.Tensor],
                      pca_dim: int | None) -> StageClusterings:
    """The candidates of a stage, from its test pass over the training images (``out``: the
    recorded outputs of :class:`~mtl_unsup.models.evaluation.SplitRecorder`)."""
    answer = module.answer()
    found = []
    for head in trained_heads(module, module.k):
        clusters = out.get(f"heads/{head}", out.get("head") if head == answer else None)
        if clusters is not None:
            found.append(Candidate(stage, head, clusters.cpu(), last_answer=head == answer))
    if "kmeans" in out:
        found.append(Candidate(stage, KMEANS, out["kmeans"].cpu(), last_answer=answer is None))
    return StageClusterings(stage, whiten(out["features"], pca_dim)[0], found)


def score_candidates(stages: list[StageClusterings], seed: int = 0) -> list[Candidate]:
    """Every candidate with every criterion (label-free)."""
    candidates = [c for s in stages for c in s.candidates]
    last_space = stages[-1].space
    for stage in stages:
        for c in stage.candidates:
            c.criteria["silhouette"] = silhouette(stage.space, c.clusters, seed=seed)
            c.criteria["silhouette_last"] = silhouette(last_space, c.clusters, seed=seed)
            others = [o for o in candidates if o is not c]
            c.criteria["consensus"] = (sum(float(normalized_mutual_info_score(c.clusters, o.clusters))
                                           for o in others) / len(others)) if others else 0.0
    return candidates


def choose(candidates: list[Candidate], criterion: str) -> Candidate:
    """The candidate ``criterion`` picks (``last``: the last stage's own answer); a tie goes to
    the later stage, then the head before k-means."""
    if criterion not in CRITERIA:
        raise ValueError(f"cluster.choose={criterion!r}: choose among {', '.join(CRITERIA)}.")
    if criterion == "last":  # the last stage's own answer (its last candidate, k-means, if none is)
        last = [c for c in candidates if c.stage == candidates[-1].stage]
        return next((c for c in last if c.last_answer), last[-1])
    stages = list(dict.fromkeys(c.stage for c in candidates))
    return max(candidates, key=lambda c: (c.criteria[criterion], stages.index(c.stage), c.name != KMEANS))


def read_scores(candidate: Candidate, metrics: dict[str, float], answer: str | None) -> None:
    """The candidate's ACC/NMI/ARI from its stage's metrics, where the images have labels
    (``answer``: that stage's own answer head)."""
    for split in ("test", "val", "train"):
        for metric in ("acc", "nmi", "ari"):
            if candidate.name == KMEANS:
                key = f"{split}/kmeans_{metric}"
            else:
                own = f"{split}/{candidate.name}/{metric}"
                key = own if own in metrics else (f"{split}/{metric}" if candidate.name == answer else "")
            if key in metrics:
                candidate.scores[f"{split}/{metric}"] = metrics[key]


def flat_metrics(candidates: list[Candidate]) -> dict[str, float]:
    """``candidates/<stage>/<name>/<criterion or score>`` for ``metrics.json``."""
    out = {}
    for c in candidates:
        for name, value in {**c.criteria, **c.scores}.items():
            out[f"candidates/{c.key}/{name}"] = float(value)
    return out


def write_candidates(path: Path, candidates: list[Candidate], chosen: Candidate, criterion: str) -> None:
    from mtl_unsup.atomic import write_text

    rows = [{"stage": c.stage, "name": c.name, "chosen": c is chosen, "stage_answer": c.last_answer,
             "criteria": {k: round(v, 6) for k, v in c.criteria.items()},
             "scores_read_with_labels": {k: round(v, 6) for k, v in c.scores.items()}} for c in candidates]
    write_text(path, json.dumps({"criterion": criterion, "candidates": rows}, indent=2) + "\n")
