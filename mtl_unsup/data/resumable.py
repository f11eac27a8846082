"""A training loader that can resume in the middle of an epoch with the same batches.

Lightning saves a loader's ``state_dict`` in the checkpoint and restores it on resume when the
loader has one. Shuffling depends only on (seed, epoch), never on the global RNG, so the resumed
epoch yields exactly the batches the interrupted one had left.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that can skip the first ``skip`` indices."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """Counts the batches it has yielded this epoch; resuming skips that many."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        self._yielded = sampler.skip // self.batch_size if isinstance(sampler, ResumableSampler) else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.skip = int(state.get("batches", 0)) * int(self.batch_size)
