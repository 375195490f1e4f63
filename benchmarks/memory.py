"""Memory: the score history per rank at CC12M scale, and process RSS per rank by ZeRO stage.

1. History: the real :class:`dissect_ds.selection.ScoreMemory` for N = 12,423,374 uids
   (CC12M) as rank r of W = 1, 2, 4, 8 (no process group is needed to build one), in
   the default float16 and in float32. Reported: the table's bytes (largest rank), the
   resident memory it adds to the process, and the peak extra memory of one
   lookup + update of a global batch (the O(B) part), against the target 2·N/W + O(B).
2. Model switches: one training step (forward + backward) of a ViT in one process, with
   and without ``model.grad_checkpointing`` (peak memory the step adds, VmHWM) and
   ``model.patch_dropout`` (step time), the same weights and batch.
3. RSS: the trainer on the demo model (configs/demo.yaml: dissect_warmup, rate 0.3,
   batch 128), 2 ranks, a short run per ZeRO stage 0–3. The ranks' peak RSS (VmHWM) is
   read from /proc from outside while they run, so the trainer needs no hook.

``python -m benchmarks.memory [--quick]`` prints the tables and writes its section of
``docs/bench/perf.md``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import common as c

COMMAND = ".venv/bin/python -m benchmarks.memory"
CC12M = 12_423_374
WORLDS = (1, 2, 4, 8)
DTYPE_BYTES = {"float16": 2, "float32": 4}
BATCH = 10_240  # the authors' CC3M global batch (8 x 1280)
MODEL = "dissect-tiny-vit"  # configs/demo.yaml's model
MIB = 2**20


# ------------------------------------------------------------------ /proc


def _status_kib(pid: int | str, key: str) -> int | None:
    """``key`` (e.g. VmHWM) of process ``pid`` in KiB, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


class PeakRss:
    """Polls a torchrun tree: torchrun's children are the ranks (RANK in their
    environment), theirs the data workers. Keeps each process's largest VmHWM (peak
    resident set, monotonic), so only growth in the last poll interval can be missed."""

    def __init__(self) -> None:
        self.ranks: dict[int, int] = {}  # rank -> peak KiB
        self.workers = 0  # largest data worker peak, KiB

    def __call__(self, root: int) -> None:
        for pid in c.children(root):
            rank, hwm = _rank_of(pid), _status_kib(pid, "VmHWM")
            if rank is None or hwm is None:
                continue
            self.ranks[rank] = max(self.ranks.get(rank, 0), hwm)
            for wpid in c.children(pid):
                self.workers = max(self.workers, _status_kib(wpid, "VmHWM") or 0)


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ results


@dataclass
class HistoryRow:
    dtype: str
    world: int
    table_bytes: int  # largest rank's table
    target_bytes: int  # bytes/uid * N / W
    rss_bytes: int  # resident memory added by building rank 0's table
    step_peak_bytes: int | None  # peak extra memory of lookup + update of BATCH uids


@dataclass
class RssRow:
    stage: int
    rank_peak_mib: dict[int, float]
    worker_peak_mib: float
    wall_s: float


@dataclass
class SwitchRow:
    setting: str
    step_peak_mib: float  # peak memory one forward + backward adds (VmHWM)
    step_s: float  # median seconds of a forward + backward


@dataclass
class Result:
    history: list[HistoryRow] = field(default_factory=list)
    switches: list[SwitchRow] = field(default_factory=list)
    switch_model: str = ""
    switch_batch: int = 0
    rss: list[RssRow] = field(default_factory=list)
    steps: int = 0
    params: int = 0  # parameters of the demo model
    load: tuple[float, float] = (float("nan"), float("nan"))
    seconds: float = 0.0


def measure_history(dtype: str, world: int) -> HistoryRow:
    """Build every rank's table for W = ``world`` and measure rank 0's (in this process;
    see :func:`measure_histories` for the allocator setting that makes RSS honest)."""
    import torch

    from dissect_ds.selection.memory import ScoreMemory

    largest = max(ScoreMemory(CC12M, r, world, dtype, "cpu").nbytes for r in range(world))
    before = _status_kib("self", "VmRSS") or 0
    mem = ScoreMemory(CC12M, 0, world, dtype, "cpu")
    rss = ((_status_kib("self", "VmRSS") or 0) - before) * 1024
    uids = torch.randint(0, CC12M, (BATCH,), generator=torch.Generator().manual_seed(0))
    scores = torch.rand(BATCH, generator=torch.Generator().manual_seed(1)) * 100
    # First calls page in library code; that is not per-step memory.
    mem.update(uids[:64], mem.lookup(uids[:64]))
    step_peak = None
    if _reset_peak():
        base = _status_kib("self", "VmRSS") or 0
        mem.lookup(uids)
        mem.update(uids, scores)
        step_peak = max(0, (_status_kib("self", "VmHWM") or 0) - base) * 1024
    target = DTYPE_BYTES[dtype] * math.ceil(CC12M / world)
    return HistoryRow(dtype, world, largest, target, rss, step_peak)


def measure_histories(work: Path) -> tuple[list[HistoryRow], int]:
    """Every (dtype, W) in a fresh process whose large allocations are all mmapped.

    glibc raises its mmap threshold when a large block is freed, after which tables of
    the next size come from already-resident heap pages and add no RSS; a fixed threshold
    (MALLOC_MMAP_THRESHOLD_) returns each freed table to the kernel, so RSS deltas count
    exactly what a table and a step's temporaries touch.
    """
    out = work / "memory" / "history.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    code = "from benchmarks.memory import history_worker; history_worker()"
    c.run(
        [str(c.BIN / "python"), "-c", code, str(out)],
        work / "logs" / "memory_history.log",
        timeout=600,
        env={"MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    saved = json.loads(out.read_text())
    return [HistoryRow(**row) for row in saved["rows"]], saved["params"]


def history_worker() -> None:
    measure_history("float16", WORLDS[-1])  # page in torch's code paths before measuring
    rows = [asdict(measure_history(d, w)) for d in DTYPE_BYTES for w in WORLDS]
    from dissect_ds.model import build_model

    params = sum(p.numel() for p in build_model(MODEL)[0].parameters())
    Path(sys.argv[-1]).write_text(json.dumps({"rows": rows, "params": params}))


SWITCHES = {
    "plain": {},
    "model.grad_checkpointing=true": {"grad_checkpointing": True},
    "model.patch_dropout=0.5": {"patch_dropout": 0.5},
}


def _train_step(model, images, tokens) -> float:
    """Seconds of one forward + backward (gradients kept allocated, zeroed in place)."""
    from dissect_ds.loss import contrastive_loss

    t0 = time.perf_counter()
    out = model(images, tokens)
    loss, _ = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"], [len(images)], 0)
    loss.backward()
    model.zero_grad(set_to_none=False)  # only activations come and go between steps
    return time.perf_counter() - t0


def switch_worker() -> None:
    """Measure :data:`SWITCHES` on ``argv[-3]`` (model) at batch ``argv[-2]``; JSON to ``argv[-1]``."""
    import statistics

    import torch

    from dissect_ds.model import build_model

    name, batch, out = sys.argv[-3], int(sys.argv[-2]), sys.argv[-1]
    torch.set_num_threads(1)
    rows, state = [], None
    for setting, kw in SWITCHES.items():
        model, _, _, tokenizer = build_model(name, **kw)
        state = state or model.state_dict()
        model.load_state_dict(state)
        model.train()
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        tokens = tokenizer([f"a photo of thing {i}" for i in range(batch)])
        torch.manual_seed(0)  # patch dropout draws the same patches in every repeat
        _train_step(model, images, tokens)  # allocate gradients, page in code
        peak = None
        if _reset_peak():
            base = _status_kib("self", "VmRSS") or 0
            _train_step(model, images, tokens)
            peak = max(0, (_status_kib("self", "VmHWM") or 0) - base) / 1024
        seconds = statistics.median(_train_step(model, images, tokens) for _ in range(3))
        rows.append({"setting": setting, "step_peak_mib": peak, "step_s": seconds})
        del model
    Path(out).write_text(json.dumps(rows))


def measure_switches(work: Path, model: str, batch: int) -> list[SwitchRow]:
    """:func:`switch_worker` in a fresh process with mmapped large blocks (honest RSS deltas)."""
    out = work / "memory" / "switches.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    code = "from benchmarks.memory import switch_worker; switch_worker()"
    c.run(
        [str(c.BIN / "python"), "-c", code, model, str(batch), str(out)],
        work / "logs" / "memory_switches.log",
        timeout=1200,
        env={"MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return [SwitchRow(**row) for row in json.loads(out.read_text())]


def measure_rss(stage: int, data: Path, work: Path, steps: int, batch: int) -> RssRow:
    out, name = work / "memory", f"zero{stage}"
    shutil.rmtree(out / name, ignore_errors=True)
    overrides = [
        f"data.train={data}/train",
        "data.val=null",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"deepspeed.zero_stage={stage}",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "checkpoint.every_steps=0",
        "eval.every_steps=0",
        "log.progress=false",
    ]
    cmd = c.torchrun("-m", "dissect_ds.train", "--config", str(c.ROOT / "configs/demo.yaml"), *overrides)
    peak = PeakRss()
    wall = c.run(cmd, work / "logs" / f"memory_{name}.log", timeout=1200, poll=peak)
    c.prune_run(out / name)
    if sorted(peak.ranks) != list(range(c.NPROC)):
        raise c.BenchError(f"memory: saw ranks {sorted(peak.ranks)} of {c.NPROC} in the torchrun tree")
    return RssRow(stage, {r: kib / 1024 for r, kib in sorted(peak.ranks.items())}, peak.workers / 1024, wall)


def run(quick: bool, work: Path) -> Result:
    t0, load0 = time.perf_counter(), c.loadavg()
    result = Result()
    result.history, result.params = measure_histories(work)
    result.switch_model, result.switch_batch = ("dissect-tiny-vit", 8) if quick else ("ViT-B-32", 16)
    result.switches = measure_switches(work, result.switch_model, result.switch_batch)
    for row in result.switches:
        print(f"memory: {row.setting}: step adds {row.step_peak_mib:.0f} MiB, {row.step_s:.2f} s", flush=True)
    samples, shard, batch, steps, stages = (512, 128, 32, 3, (2,)) if quick else (4096, 512, 128, 12, (0, 1, 2, 3))
    data = c.timed_setup(work, samples, shard)
    result.steps = steps
    for stage in stages:
        result.rss.append(measure_rss(stage, data, work, steps, batch))
        print(f"memory: ZeRO-{stage} peak RSS {result.rss[-1].rank_peak_mib} MiB", flush=True)
    result.load, result.seconds = (load0, c.loadavg()), time.perf_counter() - t0
    return result


def render(r: Result) -> str:
    hist_rows = []
    for h in r.history:
        step = "n/a" if h.step_peak_bytes is None else f"{h.step_peak_bytes / 1024:.0f} KiB"
        hist_rows.append(
            [
                h.dtype,
                h.world,
                f"{h.table_bytes:,}",
                f"{h.target_bytes:,}",
                f"{h.table_bytes / h.target_bytes:.4f}",
                f"{h.rss_bytes / MIB:.1f}",
                step,
            ]
        )
    fp16 = [h for h in r.history if h.dtype == "float16"]
    ok = all(h.table_bytes <= h.target_bytes for h in fp16)
    rss_rows = [
        [f"ZeRO-{x.stage}", *(f"{x.rank_peak_mib[k]:.0f}" for k in sorted(x.rank_peak_mib)), f"{x.worker_peak_mib:.0f}"]
        + [f"{x.wall_s:.0f}"]
        for x in r.rss
    ]
    rank_cols = [f"rank {k} peak RSS MiB" for k in range(c.NPROC)]
    plain = r.switches[0] if r.switches else None
    switch_rows = [
        [
            f"`{x.setting}`",
            "n/a" if x.step_peak_mib is None else f"{x.step_peak_mib:.0f}",
            "n/a"
            if x.step_peak_mib is None or not plain.step_peak_mib
            else f"{x.step_peak_mib / plain.step_peak_mib:.2f}",
            f"{x.step_s:.2f}",
            f"{x.step_s / plain.step_s:.2f}",
        ]
        for x in r.switches
    ]
    return "\n".join(
        [
            "### Memory: score history and RSS per rank",
            "",
            f"Reproduce: `{COMMAND}`. {c.machine_line(r.load)}",
            "",
            f"Score history (`dissect_ds.selection.ScoreMemory`, the real table) for N = {CC12M:,} uids (CC12M), "
            "built as each rank r of W without a process group; bytes of the largest rank's table against the "
            f"target bytes/uid · ⌈N/W⌉; the resident memory building rank 0's table added (VmRSS); the peak extra "
            f"memory of one `lookup` + `update` of a global batch of B = {BATCH:,} uids (VmHWM after resetting it): "
            "the O(B) part.",
            "",
            c.md_table(
                [
                    "dtype",
                    "W",
                    "bytes per rank",
                    "target bytes",
                    "bytes / target",
                    "RSS added MiB",
                    f"lookup+update (B={BATCH:,})",
                ],
                hist_rows,
            ),
            "",
            f"Target history ≤ 2·N/W bytes + O(B) (float16, the default): {'met' if ok else '**not met**'}; "
            "float32 (`selection.history_dtype=float32`) doubles it.",
            "",
            f"Model switches: one forward + backward of `{r.switch_model}` (open_clip, fp32, one torch thread) "
            f"on a batch of {r.switch_batch} random images and captions, the same weights in every row; the "
            "peak memory the step adds over the resident weights and gradients (VmHWM after resetting it) and "
            "the median of 3 steps' seconds. Gradient checkpointing recomputes each transformer block in the "
            "backward pass instead of keeping its activations; patch dropout trains on half the image patches "
            "(scoring and evaluation see all of them).",
            "",
            c.md_table(["setting", "step adds MiB", "ratio to plain", "step s", "ratio to plain"], switch_rows),
            "",
            f"Peak RSS per rank (VmHWM, polled from /proc every 0.2 s while the ranks run), configs/demo.yaml "
            f"(`dissect-tiny-vit`, dissect_warmup, batch 128, fp32), {c.NPROC} ranks via torchrun, {r.steps} "
            "steps and the final checkpoint, one run per stage; data workers (forked, sharing pages with their "
            f"rank) apart. The model has {r.params / 1e6:.2f} M parameters: fp32 weights, gradients and AdamW's "
            f"two moments take {16 * r.params / MIB:.0f} MiB per full copy, so partitioning them over "
            f"{c.NPROC} ranks can save at most {16 * r.params * (1 - 1 / c.NPROC) / MIB:.0f} MiB per rank; the "
            "rest of a rank's RSS is the Python/torch/DeepSpeed runtime, activations and ZeRO's own flat "
            "buffers and reduction buckets, which on a model this small can outweigh what partitioning saves.",
            "",
            c.md_table(["ZeRO stage", *rank_cols, "data worker peak MiB", "run wall-clock s"], rss_rows),
            "",
            f"Produced in {r.seconds / 60:.1f} min.",
        ]
    )


def main(argv: list[str] | None = None) -> Result:
    return c.part_main("memory", run, render, argv, __doc__, "tiny run, ZeRO-2 only (smoke test)")


if __name__ == "__main__":
    main()
