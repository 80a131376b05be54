"""Aspect-ratio grouped batching.

Batching images of similar shape (all landscape or all portrait) wastes less padding when the
detector pads a batch to its largest image. :class:`GroupedBatchSampler` wraps any index
sampler (``RandomSampler``, ``SequentialSampler``, ``DistributedSampler`` ...), so sharding and
shuffling stay the wrapped sampler's business (call its ``set_epoch`` as usual, or ours).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

from torch.utils.data import Sampler, Subset

__all__ = ["GroupedBatchSampler", "aspect_ratio_group_ids"]


class GroupedBatchSampler(Sampler[List[int]]):
    """Yield batches whose indices share a group id.

    Indices are taken in the wrapped sampler's order and buffered per group; a group's buffer is
    emitted as soon as it holds ``batch_size`` indices. At the end, the leftovers of all groups
    (fewer than ``batch_size`` per group) are emitted in sampling order in chunks of
    ``batch_size``, so those last few batches may mix groups. Every sampled index is yielded
    exactly once, and the number of batches is ``ceil(len(sampler) / batch_size)``
    (``floor`` with ``drop_last=True``, which drops the final short batch) whatever the order.

    Args:
        sampler: yields dataset indices.
        group_ids: ``group_ids[i]`` is the group of dataset index ``i`` (any hashable ints).
        batch_size: indices per batch, > 0.
        drop_last: drop the final batch if it is short.
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int,
                 *, drop_last: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not hasattr(sampler, "__iter__"):
            raise ValueError(f"sampler must be iterable, got {type(sampler).__name__}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Forward to the wrapped sampler (e.g. ``DistributedSampler``) if it supports it."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[List[int]]:
        buffers: Dict[int, List[int]] = {}
        positions: Dict[int, List[int]] = {}  # sampling position of each buffered index
        for position, index in enumerate(self.sampler):
            try:
                group = self.group_ids[index]
            except IndexError:
                raise ValueError(
                    f"sampler yielded index {index} but group_ids has only {len(self.group_ids)} entries"
                ) from None
            buffer = buffers.setdefault(group, [])
            buffer.append(index)
            positions.setdefault(group, []).append(position)
            if len(buffer) == self.batch_size:
                yield buffer
                buffers[group], positions[group] = [], []
        # Leftovers in sampling order (a DistributedSampler may repeat an index, hence positions).
        leftovers = sorted(
            (pos, index) for group in buffers for pos, index in zip(positions[group], buffers[group])
        )
        leftover_indices = [index for _, index in leftovers]
        for start in range(0, len(leftover_indices), self.batch_size):
            batch = leftover_indices[start:start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        if self.drop_last:
            return n // self.batch_size
        return (n + self.batch_size - 1) // self.batch_size


def aspect_ratio_group_ids(dataset) -> List[int]:
    """Group id per sample: ``1`` for landscape/square (``width / height >= 1``), ``0`` for
    portrait. ``dataset`` needs ``image_aspect_ratios()`` (e.g. :class:`CocoDetection`,
    read from the json without decoding); a :class:`torch.utils.data.Subset` of one works too."""
    if isinstance(dataset, Subset):
        ratios = aspect_ratio_group_ids(dataset.dataset)
        return [ratios[i] for i in dataset.indices]
    if not hasattr(dataset, "image_aspect_ratios"):
        raise ValueError(f"dataset must provide image_aspect_ratios(), got {type(dataset).__name__}")
    return [1 if ratio >= 1.0 else 0 for ratio in dataset.image_aspect_ratios()]
