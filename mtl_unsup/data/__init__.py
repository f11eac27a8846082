from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.data.images import DataError, ImageList, load_image, scan_folder

__all__ = ["DataError", "ImageFolderDataModule", "ImageList", "load_image", "scan_folder"]
