"""Deterministic stand-ins for the model, the batch and the historical model.

Used by the selection tests (one process and multi-rank) and usable by trainer tests:
features are a pure function of (uid, model version), so every rank and any batch split
sees bitwise-identical per-row scores, and "training" is ``model.version += 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dissect_ds.model import Features


@dataclass
class FakeBatch:
    """A Batch-like object: ``uids`` ``[b]`` int64 and ``noisy`` ``[b]`` bool or None."""

    uids: torch.Tensor
    noisy: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.uids.shape[0])

    @classmethod
    def cat(cls, parts: list[FakeBatch]) -> FakeBatch:
        noisy = None if any(p.noisy is None for p in parts) else torch.cat([p.noisy for p in parts])
        return cls(torch.cat([p.uids for p in parts]), noisy)


class FakeClip:
    """Features from fixed per-uid tables plus a drift growing with ``version``.

    Clean pairs: text = image + noise (cosine about 0.8). Noisy pairs: unrelated text.
    ``bad`` pairs: text = -image (score 0). As ``version`` grows every caption moves
    toward its image, noisy ones three times faster ("memorisation"), and images drift.
    """

    def __init__(
        self,
        num_uids: int,
        dim: int = 16,
        seed: int = 0,
        noisy: torch.Tensor | None = None,
        bad: torch.Tensor | None = None,
        logit_scale: float = 20.0,
        device: torch.device | str = "cpu",
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.img = torch.randn(num_uids, dim, generator=g)
        noise = torch.randn(num_uids, dim, generator=g)
        self.drift = torch.randn(num_uids, dim, generator=g)
        self.noisy = torch.zeros(num_uids, dtype=torch.bool) if noisy is None else noisy.bool()
        bad = torch.zeros(num_uids, dtype=torch.bool) if bad is None else bad.bool()
        txt = torch.where(self.noisy[:, None], noise, self.img + 0.5 * noise)
        self.txt = torch.where(bad[:, None], -self.img, txt)
        self.logit_scale, self.device = logit_scale, torch.device(device)
        self.version = 0.0
        self.encode_calls = 0

    def features(self, uids: torch.Tensor, version: float) -> Features:
        uids = uids.cpu().long()
        v = float(version)
        pull = 0.05 * v * (1.0 + 3.0 * self.noisy[uids].float())[:, None]
        img = F.normalize(self.img[uids] + 0.1 * v * self.drift[uids], dim=-1)
        txt = F.normalize(self.txt[uids] + pull * self.img[uids], dim=-1)
        return Features(image=img.to(self.device), text=txt.to(self.device), logit_scale=self.logit_scale)

    def encode(self, batch: FakeBatch) -> Features:
        self.encode_calls += 1
        return self.features(batch.uids, self.version)


class FakeHistorical:
    """A :class:`~dissect_ds.selection.HistoricalModel` that freezes a ``FakeClip`` version."""

    def __init__(self, live: FakeClip) -> None:
        self.live = live
        self.version: float | None = None
        self.encode_calls = self.refresh_calls = 0

    def encode(self, batch: FakeBatch) -> Features:
        assert self.version is not None, "encode before refresh"
        self.encode_calls += 1
        return self.live.features(batch.uids, self.version)

    def refresh(self) -> None:
        self.refresh_calls += 1
        self.version = self.live.version

    def ema_update(self, decay: float) -> None:
        self.version = decay * self.version + (1.0 - decay) * self.live.version

    def state_dict(self) -> dict:
        return {"version": self.version}

    def load_state_dict(self, sd: dict) -> None:
        self.version = sd["version"]


def scores_as_features(scores: torch.Tensor) -> Features:
    """Features whose clip_score is ``scores`` ([b] in [0, 100]): text at angle acos(s / 100)."""
    cos = (scores.double() / 100.0).clamp(-1.0, 1.0)
    image = torch.zeros(scores.shape[0], 2, dtype=torch.float64)
    image[:, 0] = 1.0
    text = torch.stack([cos, (1.0 - cos * cos).sqrt()], dim=1)
    return Features(image=image.float(), text=text.float(), logit_scale=20.0)


class FakeReference:
    """A :class:`~dissect_ds.selection.historical.ReferenceModel`: another ``FakeClip`` (its
    own embedding width and logit scale allowed) frozen at one version."""

    def __init__(self, model: FakeClip, version: float = 0.0) -> None:
        self.model, self.version = model, version
        self.encode_calls = 0

    def encode(self, batch: FakeBatch) -> Features:
        self.encode_calls += 1
        return self.model.features(batch.uids, self.version)
