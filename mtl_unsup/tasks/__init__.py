from mtl_unsup.tasks.base import Task, TaskBatch
from mtl_unsup.tasks.cluster import ClusterTask
from mtl_unsup.tasks.contrastive import ContrastiveTask
from mtl_unsup.tasks.rotation import RotationTask

__all__ = ["ClusterTask", "ContrastiveTask", "RotationTask", "Task", "TaskBatch"]
