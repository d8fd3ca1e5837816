"""Datasets (Omniglot, Fashion-MNIST, ImageFolder), splits and the episode sampler."""

from training.data.fashion_mnist import load_fashion_mnist, read_idx
from training.data.image_folder import load_image_folder
from training.data.imageset import ImageSet
from training.data.omniglot import data_root, load_omniglot, omniglot_preprocess
from training.data.sampler import Episode, EpisodeSampler
from training.data.split import split_classes

__all__ = [
    "Episode",
    "EpisodeSampler",
    "ImageSet",
    "data_root",
    "load_fashion_mnist",
    "load_image_folder",
    "load_omniglot",
    "omniglot_preprocess",
    "read_idx",
    "split_classes",
]
