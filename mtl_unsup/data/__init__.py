"""Reading images (and rows of embeddings) into splits served by dataset index."""

from typing import Any

__all__ = ["DataError", "ImageFolderDataModule", "ImageList", "load_image", "scan_folder"]


def __getattr__(name: str) -> Any:  # torch and Lightning load on first use
    if name == "ImageFolderDataModule":
        from mtl_unsup.data.datamodule import ImageFolderDataModule

        return ImageFolderDataModule
    if name in __all__:
        from mtl_unsup.data import images

        return getattr(images, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
