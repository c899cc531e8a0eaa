"""The torch Dataset: reads a sample, augments it, resizes to the model input, derives the edge map.

Randomness is a function of (seed, epoch, index) only, so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from diffiml.constants import IMAGE_MEAN, IMAGE_STD
from diffiml.train.data.augment import augment
from diffiml.train.data.edges import edge_map
from diffiml.train.data.readers import Sample, load_pair

log = logging.getLogger(__name__)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ImageNet-normalized."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class ForgeryDataset(Dataset):
    def __init__(self, samples: list[Sample], image_size: int, train: bool = True, seed: int = 0,
                 inpaint_augment: bool = True) -> None:
        if not samples:
            raise ValueError("the dataset is empty: no readable [image, mask] rows")
        self.samples, self.size, self.train, self.seed = samples, image_size, train, seed
        self.epoch = 0
        self.inpaint_augment = inpaint_augment

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Load the sample, or the next readable one: a broken file is reported and skipped, never fatal."""
        for k in range(len(self.samples)):
            sample = self.samples[(index + k) % len(self.samples)]
            try:
                return load_pair(sample)
            except ValueError as exc:
                log.warning("skipping unreadable sample: %s", exc)
        raise ValueError("no sample of the dataset could be read")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self._load(index)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask = augment(image, mask, rng, inpaint=self.inpaint_augment)
        image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        edge = edge_map(mask)
        return {
            "image": normalize_image(image),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "edge": torch.from_numpy(edge.astype(np.float32))[None],
        }
