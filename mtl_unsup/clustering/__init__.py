from mtl_unsup.clustering.kmeans import ClusterState, cluster_features, fill_empty_clusters

__all__ = ["ClusterState", "cluster_features", "fill_empty_clusters"]
