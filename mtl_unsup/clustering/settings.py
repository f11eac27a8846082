"""The ``cluster`` config group as the refresh reads it (no heavy imports: checked before any
library loads)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ASSIGNS = ("kmeans", "sinkhorn")
MARGINALS = ("uniform", "min_size", "none")


@dataclass(frozen=True)
class ClusterSettings:
    """The ``cluster`` config group, as the refresh uses it. These defaults are the config's
    (:class:`mtl_unsup.config.ClusterConfig` reads them): one default per setting."""

    pca_dim: int | None = 32
    niter: int = 20
    nredo: int = 5
    warm_start: bool = True
    assign: str = "sinkhorn"
    marginals: str = "uniform"
    min_size: float = 0.5
    sinkhorn_epsilon: float = 0.05
    k_range: tuple[int, int] = (2, 20)
    k_criterion: str = "silhouette"
    sharded: bool = False
    pca_sample: int = 100_000

    @classmethod
    def from_config(cls, cluster: Any) -> ClusterSettings:
        """The settings of a ``cluster`` config group (its other keys, such as ``k``, ignored)."""
        values = {f.name: cluster[f.name] for f in dataclasses.fields(cls) if f.name in cluster}
        if "k_range" in values:
            values["k_range"] = tuple(values["k_range"])
        return cls(**values)

    def __post_init__(self) -> None:
        if self.assign not in ASSIGNS:
            raise ValueError(f"cluster.assign={self.assign!r} is not one of {', '.join(ASSIGNS)}")
        if self.marginals not in MARGINALS:
            raise ValueError(f"cluster.marginals={self.marginals!r} is not one of {', '.join(MARGINALS)}")
        if not 0 <= self.min_size <= 1:
            raise ValueError(f"cluster.min_size={self.min_size} must lie in [0, 1] (a share of the "
                             "mean cluster size)")
        if self.sinkhorn_epsilon <= 0:
            raise ValueError(f"cluster.sinkhorn_epsilon={self.sinkhorn_epsilon} must be > 0")
        if self.pca_sample < 0:
            raise ValueError(f"cluster.pca_sample={self.pca_sample} must be >= 0 (0: every row)")
        if self.sharded and self.assign != "kmeans":
            raise ValueError("cluster.sharded=true clusters with k-means only: set cluster.assign=kmeans "
                             "(a balanced assignment needs every row on one rank); cluster=sharded sets it")
