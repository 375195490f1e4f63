"""Data loader: pairs per CPU-second of our training stream and of open_clip_train's
webdataset pipeline on the same shards of real-sized JPEGs, and of the raw decode.

At selection rate r the model trains r·B of the B decoded pairs, so the loader must
deliver about 1 / (f + r) times the pairs per second full-data training needs (f: the
scoring forward's share of a training step, about 1/3): 1.6x at r = 0.3, 1.2x at r = 0.5.

Shards: synthetic scenes rendered at each of ``SIDES`` px and stored as JPEG (quality
90), written once under the work directory. Every pipeline turns them into ViT-B/32 training inputs
(open_clip's train transform: random resized crop to 224 px, normalisation) and tokenized
captions, in batches of ``BATCH``, with 1 and 2 DataLoader workers (ours ships uint8
images and leaves open_clip's final scaling and normalisation to the accelerator, as the
trainer does; open_clip_train ships float32 from the workers); the pairs it delivers
are divided by the CPU seconds the whole process tree spent meanwhile (the main process
and its workers), after a warm-up. The raw decode (PIL's decode and RGB conversion of the
same JPEG bytes, nothing else, in this process) is the reference, with and without
PIL's draft mode (decoding at a reduced DCT scale that still covers 224 px), which our
stream uses for JPEGs.

``python -m benchmarks.loader [--quick]`` prints the table and writes its section of
``docs/bench/perf.md``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import common as c

COMMAND = ".venv/bin/python -m benchmarks.loader"
MODEL = "ViT-B-32"
SIDES = (256, 512)  # stored JPEG sides, px (img2dataset's usual range)
BATCH = 64
# Published full-data training throughput per GPU (open_clip, mixed precision, 224 px,
# data loading included): the LAION scaling-laws runs (Cherti et al., "Reproducible scaling
# laws for contrastive language-image learning", CVPR 2023) on A100-40GB nodes, from the
# training records their first author published (GPU_SOURCE): samples/s / GPUs.
GPU_SOURCE = "https://huggingface.co/mehdidc/test/blob/main/trained_models_info.csv"
GPU_PAIRS_PER_S = {
    "ViT-B/32": 108_845 / 128,  # Model-B-32_Data-80M_Samples-13B: 128 GPUs, local batch 256
    "ViT-B/16": 136_371 / 344,  # Model-B-16_Data-400M_Samples-3B: 344 GPUs, local batch 256
}
SCORE_SHARE = 1 / 3  # the scoring forward's share of a training step


@dataclass
class Row:
    side: int
    pipeline: str
    workers: int
    pairs_per_cpu_s: list[float] = field(default_factory=list)
    pairs_per_s: list[float] = field(default_factory=list)


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    samples: int = 0
    jpeg_kib: dict[int, float] = field(default_factory=dict)
    load: tuple[float, float] = (float("nan"), float("nan"))
    seconds: float = 0.0


def write_jpeg_shards(out: Path, num: int, shard: int, side: int) -> Path:
    """``num`` synthetic pairs as ``side`` px JPEGs in shards of ``shard`` (written once)."""
    if (out / "sizes.json").exists():
        return out
    import numpy as np
    from PIL import Image

    from dissect_ds.data import ShardWriter
    from dissect_ds.data.synthetic import _train_caption, _train_scenes, render

    tmp = out.with_name(out.name + ".tmp")
    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp), shard) as writer:
        for uid, scene in enumerate(_train_scenes(num, rng)):
            png = render(scene, side, rng)
            buf = io.BytesIO()
            Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=90)
            writer.write(uid=uid, image=buf.getvalue(), image_ext="jpg", caption=_train_caption(scene, rng))
    tmp.rename(out)
    return out


def _measure(batches, skip: int, count: int) -> tuple[float, float]:
    """(pairs per CPU-second of this process tree, pairs per second) over ``count``
    batches after ``skip`` warm-up batches."""
    it = iter(batches)
    for _ in range(skip):
        next(it)
    me = os.getpid()
    cpu0, t0 = time.process_time() + c.tree_cpu_seconds(me), time.perf_counter()
    pairs = sum(_pairs(b) for b in itertools.islice(it, count))
    cpu, wall = time.process_time() + c.tree_cpu_seconds(me) - cpu0, time.perf_counter() - t0
    return pairs / cpu, pairs / wall


def _pairs(batch) -> int:
    return len(batch) if not isinstance(batch, (tuple, list)) else len(batch[0])


def ours(data: Path, workers: int, preprocess, tokenizer, draft: bool):
    """The trainer's stream: uint8 images (normalised later, on the accelerator)."""
    from dissect_ds.data import DataConfig, build_train_stream
    from dissect_ds.model import split_normalize

    cfg = DataConfig(train=str(data), num_workers=workers, shuffle_buffer=256)
    return build_train_stream(
        cfg,
        seed=0,
        rank=0,
        world_size=1,
        batch_size=BATCH,
        preprocess=split_normalize(preprocess)[0],
        tokenizer=tokenizer,
        draft_size=224 if draft else None,
    )


def open_clip_train(data: Path, workers: int, preprocess, tokenizer, num: int):
    """open_clip_train's own ``get_wds_dataset`` (its --train-data pipeline)."""
    get_wds_dataset = c.open_clip_train_data().get_wds_dataset
    shards = sorted(str(p) for p in data.glob("*.tar"))
    args = argparse.Namespace(
        train_data="::".join(shards),
        val_data=None,
        train_num_samples=num,
        val_num_samples=None,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=BATCH,
        workers=workers,
        world_size=1,
    )
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    return itertools.chain.from_iterable(itertools.repeat(info.dataloader))


def raw_decode(data: Path, draft: bool, limit: int) -> float:
    """Pairs per CPU-second of PIL decode + RGB conversion of the shards' JPEG bytes."""
    from PIL import Image

    from dissect_ds.data.shards import read_shard

    blobs = [s["jpg"] for p in sorted(data.glob("*.tar")) for s in read_shard(str(p))][:limit]
    t0 = time.process_time()
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as img:
            if draft:
                img.draft("RGB", (224, 224))
            img.load()
            img.convert("RGB")
    return len(blobs) / (time.process_time() - t0)


def run(quick: bool, work: Path) -> Result:
    import open_clip
    import torch

    t0, load0 = time.perf_counter(), c.loadavg()
    torch.set_num_threads(1)
    num, shard, repeats, count = (256, 64, 1, 2) if quick else (1024, 128, 3, 8)
    result = Result(samples=num)
    _, preprocess, _ = open_clip.create_model_and_transforms(MODEL, device="cpu")
    tokenizer = open_clip.get_tokenizer(MODEL)
    rows: dict[tuple[int, str, int], Row] = {}
    for side in SIDES[:1] if quick else SIDES:  # the smoke version: one size
        data = write_jpeg_shards(work / "data" / f"jpeg{side}_n{num}", num, shard, side)
        result.jpeg_kib[side] = sum(p.stat().st_size for p in data.glob("*.tar")) / num / 1024
        makers = {
            "dissect_ds": lambda w, d=data: ours(d, w, preprocess, tokenizer, draft=True),
            "dissect_ds, no draft decode": lambda w, d=data: ours(d, w, preprocess, tokenizer, draft=False),
            "open_clip_train": lambda w, d=data: open_clip_train(d, w, preprocess, tokenizer, num),
        }
        for _ in range(repeats):  # interleaved, so background load hits every pipeline alike
            for workers in (1, 2):
                for name, make in makers.items():
                    row = rows.setdefault((side, name, workers), Row(side, name, workers))
                    per_cpu, per_s = _measure(make(workers), skip=2, count=count)
                    row.pairs_per_cpu_s.append(per_cpu)
                    row.pairs_per_s.append(per_s)
            for draft in (False, True):
                name = "raw PIL decode" + (" (draft mode)" if draft else "")
                row = rows.setdefault((side, name, 0), Row(side, name, 0))
                row.pairs_per_cpu_s.append(raw_decode(data, draft, 4 * BATCH if quick else num))
    result.rows = list(rows.values())
    for row in result.rows:
        mid = statistics.median(row.pairs_per_cpu_s)
        print(f"loader: {row.side} px, {row.pipeline}, {row.workers} worker(s): {mid:.0f} pairs/CPU-s", flush=True)
    result.load, result.seconds = (load0, c.loadavg()), time.perf_counter() - t0
    return result


def best(r: Result, pipeline: str, side: int) -> float:
    """The pipeline's best median pairs per CPU-second over worker counts."""
    return max(
        (statistics.median(x.pairs_per_cpu_s) for x in r.rows if x.pipeline == pipeline and x.side == side),
        default=float("nan"),
    )


def render(r: Result) -> str:
    def med(row: Row, attr: str = "pairs_per_cpu_s") -> float:
        return statistics.median(getattr(row, attr))

    by = {(x.side, x.pipeline, x.workers): x for x in r.rows}
    table = []
    for x in r.rows:
        oc, raw = by.get((x.side, "open_clip_train", x.workers)), by.get((x.side, "raw PIL decode", 0))
        table.append(
            [
                f"{x.side} px",
                x.pipeline,
                x.workers or "- (in process)",
                c.Spread.of(x.pairs_per_cpu_s).fmt(0),
                f"{med(x, 'pairs_per_s'):.0f}" if x.pairs_per_s else "-",
                f"{med(x) / med(oc):.2f}" if oc and x.workers else "-",
                f"{med(x) / med(raw):.2f}" if raw else "-",
            ]
        )
    need = []
    for model, gpu in GPU_PAIRS_PER_S.items():
        for rate in (1.0, 0.5, 0.3):
            factor = 1.0 if rate == 1.0 else 1 / (SCORE_SHARE + rate)
            need.append([model, "full data" if rate == 1.0 else f"r = {rate}", f"{factor:.2f}", f"{gpu * factor:,.0f}"])
    ratios = {side: best(r, "dissect_ds", side) / best(r, "open_clip_train", side) for side in r.jpeg_kib}
    ours_best = min(best(r, "dissect_ds", side) for side in r.jpeg_kib)
    return "\n".join(
        [
            "### Data loader: pairs per CPU-second",
            "",
            f"Reproduce: `{COMMAND}`. {c.machine_line(r.load)}",
            "",
            f"{r.samples:,} synthetic pairs stored as JPEGs (quality 90) at "
            + " and ".join(f"{side} px ({kib:.0f} KiB per pair)" for side, kib in r.jpeg_kib.items())
            + f", read from webdataset shards and turned into {MODEL} training inputs "
            f"(open_clip's train transform, 224 px) and tokens in batches of {BATCH}; one torch thread. "
            "Pairs per CPU-second = pairs delivered / CPU seconds of the whole process tree (main process and "
            "DataLoader workers) over the measured batches, after 2 warm-up batches: the pairs one core "
            "delivers. Median [min-max] over interleaved repeats. The raw decode (PIL decode and RGB "
            "conversion only) bounds any pipeline that decodes every image; the draft-mode decode is what "
            "our stream does for JPEGs larger than the model input.",
            "",
            c.md_table(
                ["JPEG side", "pipeline", "workers", "pairs / CPU-s", "pairs / s", "/ open_clip_train", "/ raw decode"],
                table,
            ),
            "",
            "Ours / open_clip_train (best worker count each): "
            + ", ".join(f"{ratio:.2f} at {side} px" for side, ratio in ratios.items())
            + f" (target >= 1.0: {'met' if min(ratios.values()) >= 1.0 else '**not met**'}). Draft mode needs a "
            "JPEG at least twice the input side (448 px for 224) to decode at a reduced scale; below that both "
            "pipelines decode at full size and the transform (resized crop, normalisation) dominates.",
            "",
            "What one GPU needs: at rate r the model trains r of the B pairs it scores, so the loader must deliver "
            f"1 / (f + r) times the full-data rate (f = {SCORE_SHARE:.2f}, the scoring forward's share of a step). "
            "Full-data rates per GPU are published ones: open_clip's training throughput in the LAION "
            "scaling-laws runs (Cherti et al., CVPR 2023; A100-40GB, mixed precision, 224 px, local batch 256; "
            f"samples/s over GPUs from the training records at {GPU_SOURCE}): "
            + ", ".join(f"{m} {v:,.0f} pairs/s" for m, v in GPU_PAIRS_PER_S.items())
            + ". We found no published per-GPU figure for RN50. Newer GPUs train faster, and the need "
            "scales with it (`scripts/gpu_smoke.sh` measures yours).",
            "",
            c.md_table(["model", "selection", "x full data", "pairs / s needed"], need),
            "",
            f"At {ours_best:.0f} pairs per CPU-second (ours, the slower size) the ViT-B/32 need at r = 0.3 "
            f"({GPU_PAIRS_PER_S['ViT-B/32'] / (SCORE_SHARE + 0.3):,.0f} pairs/s) takes about "
            f"{GPU_PAIRS_PER_S['ViT-B/32'] / (SCORE_SHARE + 0.3) / ours_best:.0f} cores of this machine's kind per GPU.",
            "",
            f"Produced in {r.seconds / 60:.1f} min.",
        ]
    )


def main(argv: list[str] | None = None) -> Result:
    return c.part_main("loader", run, render, argv, __doc__, "tiny shards, one repeat (smoke test)")


if __name__ == "__main__":
    main()
