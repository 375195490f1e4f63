"""Offline per-pair scores: run a model once over a data set, one score per uid.

``python -m dissect_ds.score --model local-dir:runs/ref/open_clip --data data/cc3m/train
--output scores/cc3m_ref`` (under torchrun, the deepspeed launcher, srun or mpirun each
process takes every W-th shard). The score is the CLIPScore of the pair,
``max(0, 100 * cos(image, text))``, the reference score of ``oracle_clipscore``, which then
reads the table (``selection.reference.scores``) instead of running the reference every step.

Output directory: one file per shard, ``shard-000123.pt`` (the shard's index in the spec)
holding ``{"uids": int64 [n], "scores": float16 [n]}``, each written whole (write, rename),
so a rerun skips the shards already done (resumable); then ``info.json``, written by rank 0
once every shard is done: ``{"num_uids", "num_samples", "scored", "model", "pretrained",
"data"}``. On disk 10 bytes per pair (int64 uid, float16 score); loaded, the table takes 2
bytes per uid: about 25 MB for CC12M's 12.4 M pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dissect_ds.data.batch import Batch
from dissect_ds.data.pipeline import shard_batches
from dissect_ds.data.shards import Shard

INFO = "info.json"


def shard_file(out: Path, index: int) -> Path:
    return out / f"shard-{index:06d}.pt"


def load_scores(folder: str | Path, num_uids: int) -> torch.Tensor:
    """The ``[num_uids]`` float16 score table of a finished output directory (NaN where a
    uid has no score: a pair skipped as unusable). Raises ValueError (one line) if the
    directory is unfinished or was made for another data set."""
    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise ValueError(f"selection.reference.scores: {folder} has no {INFO} (unfinished? rerun dissect_ds.score)")
    info = json.loads((folder / INFO).read_text())
    if info["num_uids"] != num_uids:
        raise ValueError(
            f"selection.reference.scores: {folder} scores {info['num_uids']} uids, the training data has {num_uids}"
        )
    table = torch.full((num_uids,), float("nan"), dtype=torch.float16)
    for f in sorted(folder.glob("shard-*.pt")):
        part = torch.load(f, map_location="cpu")
        table[part["uids"]] = part["scores"]
    return table


class _Shards(IterableDataset):
    """``(shard index, batch)`` for every batch of the given shards, then ``(index, None)``
    when a shard is done; each DataLoader worker decodes whole shards."""

    def __init__(self, shards: list[tuple[int, Shard]], batch_size: int, preprocess, tokenizer) -> None:
        self.shards, self.batch_size, self.preprocess, self.tokenizer = shards, batch_size, preprocess, tokenizer

    def __iter__(self) -> Iterator[tuple[int, Batch | None]]:
        info = get_worker_info()
        for index, shard in self.shards[info.id :: info.num_workers] if info else self.shards:
            for batch in shard_batches(
                shard, batch_size=self.batch_size, preprocess=self.preprocess, tokenizer=self.tokenizer
            ):
                yield index, batch
            yield index, None


def _as_is(item):
    return item


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dissect_ds.score",
        description="Score every pair of a data set once with a model (CLIPScore per uid), distributed and "
        "resumable; oracle_clipscore reads the result via selection.reference.scores=DIR.",
    )
    p.add_argument("--model", required=True, help="open_clip architecture name, or local-dir:DIR (an export)")
    p.add_argument("--pretrained", help="local weights file for --model (not with local-dir:)")
    p.add_argument("--data", required=True, help="data spec, as data.train (a prepared split directory or shards)")
    p.add_argument("--output", required=True, help="output directory (created; shards already scored are skipped)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per forward (default: %(default)s)")
    p.add_argument(
        "--num-workers",
        type=int,
        default=4,
        help="data workers per process, each decoding whole shards (default: %(default)s)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def _check(args: argparse.Namespace):
    """The data set, or exit 2 with one line (before any process group starts)."""
    from dissect_ds.data.shards import SpecError, resolve
    from dissect_ds.selection.config import ReferenceConfig

    errors = ReferenceConfig(model=args.model, pretrained=args.pretrained).validate()
    if args.batch_size <= 0:
        errors.append(f"--batch-size: must be > 0, got {args.batch_size}")
    if args.num_workers < 0:
        errors.append(f"--num-workers: must be >= 0, got {args.num_workers}")
    try:
        shardset = resolve(args.data, "--data")
    except SpecError as e:
        errors.append(str(e))
    if errors:
        line = (
            errors[0]
            .replace("selection.reference.model", "--model")
            .replace("selection.reference.pretrained", "--pretrained")
        )
        print(f"score: {line}", file=sys.stderr)
        sys.exit(2)
    return shardset


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    shardset = _check(args)

    from tqdm import tqdm

    from dissect_ds import distributed as D
    from dissect_ds.engine import device, init_distributed
    from dissect_ds.model import Features, build_model
    from dissect_ds.selection.scoring import clip_score

    info = init_distributed()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, _, preprocess, tokenizer = build_model(args.model, args.pretrained, augment=False)
    dev = device()
    model = model.to(dev).eval()
    mine = [i for i in range(info.rank, len(shardset.shards), info.world_size) if not shard_file(out, i).is_file()]
    # Rank 0's own shards: the others progress alike.
    bar = tqdm(total=sum(shardset.shards[i].size for i in mine), disable=not info.is_main, unit="pair", desc="score")
    data = _Shards([(i, shardset.shards[i]) for i in mine], args.batch_size, preprocess, tokenizer)
    workers = min(args.num_workers, len(mine))
    pending: dict[int, tuple[list, list]] = {}
    with torch.inference_mode():
        for i, batch in DataLoader(data, batch_size=None, num_workers=workers, collate_fn=_as_is):
            uids, scores = pending.setdefault(i, ([], []))
            if batch is None:  # the shard is done: write it whole
                pending.pop(i)
                target = shard_file(out, i)
                empty = torch.zeros(0)
                torch.save(
                    {
                        "uids": torch.cat(uids) if uids else empty.long(),
                        "scores": torch.cat(scores) if scores else empty.half(),
                    },
                    target.with_suffix(".tmp"),
                )
                os.replace(target.with_suffix(".tmp"), target)
                continue
            b = batch.to(dev)
            image = model.encode_image(b.images, normalize=True)
            text = model.encode_text(b.tokens, normalize=True)
            uids.append(batch.uids)
            scores.append(clip_score(Features(image, text, 1.0)).cpu().half())
            bar.update(len(batch))
    bar.close()
    D.barrier()
    if info.is_main:
        parts = [
            torch.load(shard_file(out, i), map_location="cpu")["uids"].numel() for i in range(len(shardset.shards))
        ]
        meta = {
            "num_uids": shardset.num_uids,
            "num_samples": shardset.num_samples,
            "scored": sum(parts),
            "model": args.model,
            "pretrained": args.pretrained,
            "data": args.data,
        }
        (out / "info.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(out / "info.tmp", out / INFO)
        print(f"scored {sum(parts)} of {shardset.num_samples} pairs into {out}", flush=True)
    D.barrier()


if __name__ == "__main__":
    main()
