"""Datasets, class subsets and image transforms.

Every dataset returns ``(image, label)`` and exposes ``targets``, ``ids``, ``classes`` and a settable
``transform`` (see :class:`~compatembed.data._common.LabeledImageDataset`); labels always index the
class list of the full dataset, so subsets never renumber classes.
"""

from compatembed.data._common import IMG_EXTENSIONS, LabeledImageDataset
from compatembed.data.build import SPLITS, build_dataset
from compatembed.data.cifar import TorchvisionCIFAR
from compatembed.data.folder import ImageFolderDir
from compatembed.data.shards import WebDatasetShards
from compatembed.data.subset import ClassSubset, parse_classes
from compatembed.data.synthetic import SyntheticImages
from compatembed.data.tar import ImageFolderTar
from compatembed.data.transforms import AUGMENTATIONS, Preprocessing, build_transform

__all__ = [
    "AUGMENTATIONS",
    "IMG_EXTENSIONS",
    "SPLITS",
    "ClassSubset",
    "ImageFolderDir",
    "ImageFolderTar",
    "LabeledImageDataset",
    "Preprocessing",
    "SyntheticImages",
    "TorchvisionCIFAR",
    "WebDatasetShards",
    "build_dataset",
    "build_transform",
    "parse_classes",
]
