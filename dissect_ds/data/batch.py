"""The unit the trainer consumes: a batch of image-text pairs with their sample ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """b pairs. images [b,3,H,W] float32, tokens [b,ctx] int64, uids [b] int64 (unique
    over the data set), noisy [b] bool and labels [b] int64 when every sample of the
    batch carries them in its JSON, else None."""

    images: torch.Tensor
    tokens: torch.Tensor
    uids: torch.Tensor
    noisy: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.uids.shape[0])

    @classmethod
    def cat(cls, parts: list[Batch]) -> Batch:
        """The rows of ``parts`` in order (a field is None if it is None in any part)."""

        def join(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(t is None for t in ts) else torch.cat(ts)

        return cls(
            images=torch.cat([p.images for p in parts]),
            tokens=torch.cat([p.tokens for p in parts]),
            uids=torch.cat([p.uids for p in parts]),
            noisy=join([p.noisy for p in parts]),
            labels=join([p.labels for p in parts]),
        )

    def select(self, mask_or_index: torch.Tensor) -> Batch:
        """Rows picked by a bool mask [b] or an index tensor [k]; None fields stay None."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[mask_or_index.to(t.device)]

        return Batch(
            images=pick(self.images),
            tokens=pick(self.tokens),
            uids=pick(self.uids),
            noisy=pick(self.noisy),
            labels=pick(self.labels),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move every field to `device`; images are also cast to `dtype` if given."""
        # Asynchronous only towards an accelerator: a non-blocking copy to the host
        # could be read before it lands.
        async_ = torch.device(device).type != "cpu"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=async_)

        return Batch(
            images=self.images.to(device, dtype=dtype, non_blocking=async_),
            tokens=move(self.tokens),
            uids=move(self.uids),
            noisy=move(self.noisy),
            labels=move(self.labels),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader calls this when pin_memory is on)."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return Batch(
            images=pin(self.images),
            tokens=pin(self.tokens),
            uids=pin(self.uids),
            noisy=pin(self.noisy),
            labels=pin(self.labels),
        )
