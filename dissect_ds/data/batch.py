"""The unit the trainer consumes: a batch of image-text pairs with their sample ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """b pairs. images [b,3,H,W] (uint8 from the train stream, float from others), tokens
    [b,ctx] int64, uids [b] int64 (unique over the data set), noisy [b] bool and labels [b]
    int64 when every sample of the batch carries them in its JSON, else None.
    ref_images / ref_tokens: the same pairs as a reference model of another architecture
    sees them (its own transform and tokenizer), when one is in use; else None."""

    images: torch.Tensor
    tokens: torch.Tensor
    uids: torch.Tensor
    noisy: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    ref_images: torch.Tensor | None = None
    ref_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.uids.shape[0])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """``fn`` applied to every field that is not None."""
        return Batch(
            **{f.name: None if (t := getattr(self, f.name)) is None else fn(t) for f in dataclasses.fields(self)}
        )

    @classmethod
    def cat(cls, parts: list[Batch]) -> Batch:
        """The rows of ``parts`` in order (a field is None if it is None in any part)."""

        def join(name: str) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if any(t is None for t in ts) else torch.cat(ts)

        return cls(**{f.name: join(f.name) for f in dataclasses.fields(cls)})

    def select(self, mask_or_index: torch.Tensor) -> Batch:
        """Rows picked by a bool mask [b] or an index tensor [k]; None fields stay None."""
        return self._map(lambda t: t[mask_or_index.to(t.device)])

    def to(self, device: torch.device | str) -> Batch:
        """Move every field to ``device``."""
        # Asynchronous only towards an accelerator: a non-blocking copy to the host
        # could be read before it lands.
        async_ = torch.device(device).type != "cpu"
        return self._map(lambda t: t.to(device, non_blocking=async_))

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader calls this when pin_memory is on)."""
        return self._map(lambda t: t.pin_memory())

    def reference_view(self) -> Batch:
        """The pairs as the reference model sees them (``ref_images`` / ``ref_tokens``)."""
        if self.ref_images is None or self.ref_tokens is None:
            raise ValueError("this batch carries no reference inputs (the data stream was built without them)")
        return Batch(images=self.ref_images, tokens=self.ref_tokens, uids=self.uids, noisy=self.noisy)
