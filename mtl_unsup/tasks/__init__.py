from mtl_unsup.tasks.base import Task, TaskBatch
from mtl_unsup.tasks.cluster import ClusterTask
from mtl_unsup.tasks.contrastive import ContrastiveTask
from mtl_unsup.tasks.rotation import RotationTask
from mtl_unsup.tasks.scan import ScanTask
from mtl_unsup.tasks.selflabel import SelfLabelTask

__all__ = ["ClusterTask", "ContrastiveTask", "RotationTask", "ScanTask", "SelfLabelTask", "Task",
           "TaskBatch"]
