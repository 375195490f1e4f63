"""Per-uid score memory sharded over ranks, O(N / W) per rank and O(B) traffic per step."""

from __future__ import annotations

import math

import torch

from dissect_ds import distributed as dist
from dissect_ds.selection.scoring import last_occurrence

DTYPES = {"float16": torch.float16, "float32": torch.float32}


class ScoreMemory:
    """One float per sample uid; NaN means "never written".

    Rank ``r`` of ``W`` owns the uids ``u`` with ``u % W == r`` and stores uid ``u`` at
    index ``u // W`` of a dense ``[ceil(N / W)]`` tensor. Uids are global and stable, so
    a sample finds its history whichever rank it lands on (the authors kept per-process
    dicts keyed by a non-unique ``__key__``, and shards move between GPUs every epoch).
    Values are computed in float32 and rounded to ``dtype`` when stored.
    """

    def __init__(self, num_uids: int, rank: int, world_size: int, dtype: str, device: torch.device | str) -> None:
        self.num_uids, self.rank, self.world_size = int(num_uids), int(rank), int(world_size)
        self.dtype_name = dtype
        self.table = torch.full(
            (math.ceil(self.num_uids / self.world_size),), float("nan"), dtype=DTYPES[dtype], device=device
        )

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def _owned(self, uids: torch.Tensor) -> torch.Tensor:
        return uids % self.world_size == self.rank

    def lookup(self, uids: torch.Tensor) -> torch.Tensor:
        """Values of the global batch's uids (``[B]`` int64 -> ``[B]`` float32, NaN if unseen).

        Collective: every rank passes the same ``uids``. Owners fill their entries,
        the others contribute 0, and one all-reduce(sum) of B floats gives everyone all
        values (NaN + 0 stays NaN).
        """
        owned = self._owned(uids)
        vals = torch.zeros(uids.shape[0], dtype=torch.float32, device=self.table.device)
        vals[owned] = self.table[uids[owned] // self.world_size].float()
        return dist.all_reduce(vals, "sum")

    def round(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` as they would read back after being stored (float32)."""
        return values.to(self.table.dtype).float()

    def update(self, uids: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (``[B]``) for the global ``uids`` (``[B]``); no communication.

        Every rank holds the global uids and values, so each owner writes its own
        entries. A uid present twice is written once, from its last occurrence.
        """
        keep = last_occurrence(uids)
        uids, values = uids[keep], values[keep]
        owned = self._owned(uids)
        self.table[uids[owned] // self.world_size] = values[owned].to(self.table.dtype)

    def clear(self) -> None:
        self.table.fill_(float("nan"))

    def state_dict(self) -> dict:
        """This rank's shard (on CPU) with what is needed to re-shard it."""
        return {
            "num_uids": self.num_uids,
            "world_size": self.world_size,
            "rank": self.rank,
            "dtype": self.dtype_name,
            "table": self.table.detach().cpu().clone(),
        }

    def load_shards(self, shards: list[dict]) -> None:
        """Fill this rank's shard from *all* ranks' saved shards, at any old world size.

        Old rank ``r`` of ``W_old`` holds uid ``r + W_old * j`` at index j; this keeps
        those owned under the current world size. Uids beyond the saved ``num_uids`` stay
        NaN (a data set that grew); a saved ``num_uids`` larger than ours is an error.
        """
        if not shards:
            raise ValueError("score memory: no saved shards given")
        w_old = int(shards[0]["world_size"])
        ranks = sorted(int(s["rank"]) for s in shards)
        if ranks != list(range(w_old)) or any(int(s["world_size"]) != w_old for s in shards):
            raise ValueError(f"score memory: need one shard per saved rank 0..{w_old - 1}, got ranks {ranks}")
        n_old = int(shards[0]["num_uids"])
        if n_old > self.num_uids:
            raise ValueError(f"score memory: checkpoint has {n_old} uids, this data set only {self.num_uids}")
        self.clear()
        for s in shards:
            table = s["table"].to(self.table.device)
            uids = int(s["rank"]) + w_old * torch.arange(table.shape[0], device=self.table.device)
            # The last entries of a shard are padding when N is not a multiple of W_old.
            keep = (uids < n_old) & self._owned(uids)
            self.table[uids[keep] // self.world_size] = table[keep].to(self.table.dtype)
