"""Random augmentation that a resume replays exactly.

A task's training transform (a random crop, a flip, a caption choice) draws from the global RNGs
that dropout and diffusion noise draw from too. accelerate's data loader fetches one batch ahead,
and a checkpoint saves the RNG states after that fetch: a resumed run would draw the next batch's
augmentation again from a state the first run had already moved past. Drawing each example's
batch's augmentation from its own seed, (train.seed, epoch, the batch's example indices), inside a
forked RNG, makes it independent of when and in which process (a loader worker) the batch is
fetched, and leaves the training RNG untouched.
"""

from __future__ import annotations

import random

from torch.utils.data import Dataset


class SeededExamples(Dataset):
    """A batch of `dataset` fetched under RNGs seeded from (seed, epoch, its indices); set `epoch` before each epoch."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """The DataLoader's batched fetch (a `datasets` transform then runs once per batch)."""
        import numpy as np
        import torch

        seed = hash((self.seed, self.epoch, *map(int, indices))) % 2**32  # ints hash alike in every process
        with torch.random.fork_rng(devices=[]):
            state, np_state = random.getstate(), np.random.get_state()
            torch.default_generator.manual_seed(seed)  # the CPU generator alone: a GPU's (dropout, noise) stays as it is
            random.seed(seed)
            np.random.seed(seed)
            try:
                if hasattr(self.dataset, "__getitems__"):
                    return self.dataset.__getitems__(indices)
                return [self.dataset[i] for i in indices]
            finally:
                random.setstate(state)
                np.random.set_state(np_state)
