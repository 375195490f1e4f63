"""Zero-shot classification and multi-caption retrieval on the named sets.

Every rank encodes a share of the images (and captions); top-k hit counts are summed
and retrieval features gathered over ranks, so the metrics do not depend on the world
size. The zero-shot classifier is open_clip's ``build_zero_shot_classifier``.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from open_clip import build_zero_shot_classifier
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dissect_ds import distributed as D
from dissect_ds.evaluation.config import EvalConfig
from dissect_ds.evaluation.metrics import retrieval_recalls, topk_hits
from dissect_ds.evaluation.sets import (
    RetrievalSet,
    Template,
    ZeroShotSet,
    fill_template,
    retrieval_set,
    zeroshot_set,
)

Preprocess = Callable[[Image.Image], torch.Tensor]
WDS_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


class ModelEncoder:
    """A plain open_clip model (an exported directory, a consolidated checkpoint).
    Both methods return normalised float32 features on the CPU: ``[b, D]``."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, tokenizer, device: torch.device | str = "cpu"):
        self.model, self.preprocess, self.tokenizer, self.device = model.eval(), preprocess, tokenizer, device

    @property
    def preprocess_val(self) -> Preprocess:
        return self.preprocess

    @torch.no_grad()
    def encode(self, batch):
        """Both towers on a Batch, as ``Engine.encode`` (the val-shard evaluation calls it)."""
        from dissect_ds.model import Features

        return Features(
            image=self.encode_image(batch.images),
            text=self.encode_text(batch.tokens),
            logit_scale=float(self.model.logit_scale.exp()),
        )

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device), normalize=True).float().cpu()

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device), normalize=True).float().cpu()


class EngineEncoder:
    """The trainer's Engine: its inference-mode forward in the training precision.
    Collective under ZeRO-3 (every rank calls the same number of times)."""

    def __init__(self, engine):
        self.engine, self.preprocess, self.tokenizer = engine, engine.preprocess_val, engine.tokenizer
        self.preprocess_val, self.encode = engine.preprocess_val, engine.encode

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        from dissect_ds.data import Batch

        # Engine.encode runs both towers; one-token texts keep the text tower's share negligible.
        n = images.shape[0]
        batch = Batch(images=images, tokens=torch.zeros(n, 1, dtype=torch.long), uids=torch.arange(n))
        return self.engine.encode(batch).image.cpu()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.engine.encode_text(tokens).cpu()


class _TextTower:
    """What ``build_zero_shot_classifier`` calls: ``model.encode_text(tokens, normalize=True)``."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encoder.encode_text(tokens)


class _Files(Dataset):
    def __init__(self, items: list[tuple[str, int]], preprocess: Preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, key = self.items[i]
        with Image.open(path) as img:
            return self.preprocess(img.convert("RGB")), key


class _WdsShare(IterableDataset):
    """Samples ``i`` (over all shards in order) with ``i % world == rank``, split over
    DataLoader workers; yields ``(image, cls)``."""

    def __init__(self, shards: tuple[str, ...], preprocess: Preprocess, rank: int, world: int):
        self.shards, self.preprocess, self.rank, self.world = shards, preprocess, rank, world

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        from dissect_ds.data.shards import read_shard

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        i = -1
        for url in self.shards:
            for raw in read_shard(url):
                i += 1
                if i % self.world != self.rank or (i // self.world) % workers != worker:
                    continue
                ext = next((e for e in WDS_IMAGE_KEYS if e in raw), None)
                if ext is None or "cls" not in raw:
                    raise ValueError(f"{url}: sample {raw['__key__']} lacks an image or 'cls'")
                with Image.open(io.BytesIO(raw[ext])) as img:
                    yield self.preprocess(img.convert("RGB")), int(raw["cls"].decode().strip())


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    # Its own generator: evaluation must not draw from the training RNG.
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator().manual_seed(0)
    )


def _bar(total: int | None, desc: str, enabled: bool, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled, file=sys.stdout)


def _encode_share(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], encode: Callable, spare: Callable, bar
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(features [n, D], keys [n])``. Ranks hold different batch counts and
    a ZeRO-3 forward is a collective: a finished rank encodes ``spare()`` and drops it
    until every rank is done."""
    feats, keys = [], []
    it = iter(batches)
    while True:
        item = next(it, None)
        if not D.all_reduce(torch.tensor([item is not None], dtype=torch.long), "max")[0]:
            break
        if item is None:
            encode(spare())
            continue
        x, k = item
        feats.append(encode(x).float())
        keys.append(torch.as_tensor(k, dtype=torch.long))
        bar.update(len(keys[-1]))
    dim = int(D.all_reduce(torch.tensor([feats[0].shape[1] if feats else 0]), "max")[0])
    return (
        torch.cat(feats) if feats else torch.zeros(0, dim),
        torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long),
    )


def _blank(preprocess: Preprocess) -> Callable[[], torch.Tensor]:
    return lambda: preprocess(Image.new("RGB", (64, 64)))[None]


def _zeroshot_batches(s: ZeroShotSet, preprocess: Preprocess, rank: int, world: int, batch_size: int, workers: int):
    """This rank's ``(images, labels)`` batches of ``s`` and their image count (None: unknown)."""
    if s.kind == "imagefolder":
        mine = list(s.samples[rank::world])
        return _loader(_Files(mine, preprocess), batch_size, workers), len(mine)
    if s.kind == "wds":
        workers = min(workers, len(s.shards))
        return _loader(_WdsShare(s.shards, preprocess, rank, world), batch_size, workers), None
    from dissect_ds.data import DataConfig, iter_val

    def labelled():
        cfg = DataConfig(val=s.path, num_workers=workers)
        for b in iter_val(
            cfg,
            rank=rank,
            world_size=world,
            batch_size=batch_size,
            preprocess=preprocess,
            tokenizer=lambda t: torch.zeros(len(t), 1),
        ):
            if b.labels is None:
                raise ValueError(f"eval.zeroshot.{s.name}: samples of {s.path} carry no 'label' in their JSON")
            yield b.images, b.labels

    return labelled(), None


def zeroshot_classifier(encoder, classnames: Sequence[str], templates: Sequence[Template]) -> torch.Tensor:
    """``[D, C]``: each class's prompts (``templates``: strings with ``{c}`` or ``{}``, or
    callables) encoded, averaged and normalised, by open_clip's classifier builder."""
    fill = [t if callable(t) else functools.partial(fill_template, t) for t in templates]
    return build_zero_shot_classifier(
        _TextTower(encoder), encoder.tokenizer, list(classnames), fill, num_classes_per_batch=10
    ).float()


@torch.no_grad()
def zeroshot(
    encoder, s: ZeroShotSet, rank: int, world: int, batch_size: int, num_workers: int = 0, progress: bool = False
) -> dict[str, float]:
    """``{"top1", "top5"}`` (fractions) of ``s``; collective."""
    classifier = zeroshot_classifier(encoder, s.classnames, s.templates)
    batches, share = _zeroshot_batches(s, encoder.preprocess, rank, world, batch_size, num_workers)
    hits = torch.zeros(3, dtype=torch.long)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return encoder.encode_image(images)

    with _bar(share, f"eval {s.name}", progress) as bar:
        image, labels = _encode_share(batches, encode, _blank(encoder.preprocess), bar)
    hits[:2] = topk_hits(image @ classifier, labels)
    hits[2] = labels.numel()
    hits = D.all_reduce(hits, "sum")
    n = max(1, int(hits[2]))
    return {"top1": float(hits[0]) / n, "top5": float(hits[1]) / n}


@torch.no_grad()
def retrieval(
    encoder, s: RetrievalSet, rank: int, world: int, batch_size: int, num_workers: int = 0, progress: bool = False
) -> dict[str, float]:
    """Recall@1/5/10 both ways (see :func:`retrieval_recalls`); collective."""
    files = [(p, i) for i, p in enumerate(s.images)][rank::world]
    with _bar(len(files), f"eval {s.name}", progress) as bar:
        image, ikeys = _encode_share(
            _loader(_Files(files, encoder.preprocess), batch_size, num_workers),
            encoder.encode_image,
            _blank(encoder.preprocess),
            bar,
        )
    mine = list(range(rank, len(s.captions), world))
    text_batches = (
        (encoder.tokenizer([s.captions[j] for j in mine[i : i + batch_size]]), mine[i : i + batch_size])
        for i in range(0, len(mine), batch_size)
    )
    with _bar(len(mine), f"eval {s.name} captions", progress, "caption") as bar:
        text, tkeys = _encode_share(text_batches, encoder.encode_text, lambda: encoder.tokenizer(["a"]), bar)
    image = D.all_gather_cat(image)[D.all_gather_cat(ikeys).argsort()]
    text = D.all_gather_cat(text)[D.all_gather_cat(tkeys).argsort()]
    return retrieval_recalls(image, text, torch.tensor(s.caption_image))


def evaluate_sets(encoder, cfg: EvalConfig, rank: int, world: int, progress: bool = False) -> dict[str, float]:
    """Every set of ``cfg.zeroshot`` and ``cfg.retrieval``: ``eval/<name>/top1``, ``top5``,
    ``i2t_R@k``, ``t2i_R@k``, ``mean_R@1``. Collective; the same dict on every rank."""
    out: dict[str, float] = {}
    for name, spec in cfg.zeroshot.items():
        m = zeroshot(encoder, zeroshot_set(name, spec), rank, world, cfg.batch_size, cfg.num_workers, progress)
        out.update({f"eval/{name}/{k}": v for k, v in m.items()})
    for name, spec in cfg.retrieval.items():
        m = retrieval(encoder, retrieval_set(name, spec), rank, world, cfg.batch_size, cfg.num_workers, progress)
        out.update({f"eval/{name}/{k}": v for k, v in m.items()})
    return out
