"""Clustering: k-means and its state, balanced assignment, the refresh of dataset-level targets."""

from typing import Any

__all__ = ["ClusterState", "cluster_features", "fill_empty_clusters"]


def __getattr__(name: str) -> Any:  # FAISS and torch load on first use, not with the settings
    if name in __all__:
        from mtl_unsup.clustering import kmeans

        return getattr(kmeans, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
