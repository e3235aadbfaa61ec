"""Data sets: small ones held in memory as uint8 tensors (:mod:`~gradshield.data.memory`: CIFAR-10/100,
image folders), large ones streamed from files batch by batch (:mod:`~gradshield.data.folders`:
ImageNet), the evaluation transform of a model (:mod:`~gradshield.data.preprocess`), and the
:class:`~gradshield.data.examples.Examples` an evaluation reads its batches from."""

from gradshield.data.examples import Examples, TensorExamples, as_examples, take
from gradshield.data.folders import FileExamples, image_folder_split, scan_split
from gradshield.data.memory import (
    ARCHIVE_NAME,
    CIFAR10_CLASSES,
    DATASETS,
    IMAGE_SUFFIXES,
    STREAMED,
    ImageData,
    decode_archive,
    iterate_batches,
    load_archive,
    load_dataset,
    load_image_folder,
    load_torchvision_cifar,
    per_class_index,
    random_crop_flip,
    sha256_file,
    subset_index,
)
from gradshield.data.preprocess import Preprocess, preprocess_for

__all__ = ["ARCHIVE_NAME", "CIFAR10_CLASSES", "DATASETS", "IMAGE_SUFFIXES", "STREAMED", "Examples",
           "FileExamples", "ImageData", "Preprocess", "TensorExamples", "as_examples",
           "decode_archive", "image_folder_split", "iterate_batches", "load_archive",
           "load_dataset", "load_image_folder", "load_torchvision_cifar", "per_class_index",
           "preprocess_for", "random_crop_flip", "scan_split", "sha256_file", "subset_index", "take"]
