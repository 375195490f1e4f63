"""Entry point: ``python -m dissect_ds.train --config configs/debug.yaml key=value ...``.

Works as a single process and under the deepspeed launcher, torchrun, srun and mpirun.
The loop: data -> score -> select -> step -> log -> maybe eval -> maybe save.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from dissect_ds import checkpoint as ckpt
from dissect_ds import config as C
from dissect_ds import distributed as D
from dissect_ds.rundir import RunDirBusy, RunLock

if TYPE_CHECKING:
    from dissect_ds.model import Features

EXIT_DIVERGED = 3  # a non-finite loss, gradient norm or weights stopped the run
EXIT_PREEMPTED = 75  # a signal or the launcher's death stopped the run after a checkpoint (EX_TEMPFAIL)


@dataclass
class TrainState:
    """Everything besides model/optimizer/history that an exact resume needs."""

    step: int = 0
    samples_seen: int = 0
    selected_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)


class TorchRNG:
    """The CPU RNG and this rank's CUDA RNG (patch dropout draws on the device) as a checkpoint
    component (per rank: restored at the same world size)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def restore(state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        if isinstance(state, torch.Tensor):  # checkpoints written before the CUDA state was kept
            state = {"cpu": state}
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class Preempted(Exception):
    """The run stopped at a step boundary after writing its checkpoint."""


class Preemption:
    """SIGUSR1/SIGTERM, or the death of the launcher that started this rank, set a flag; ranks
    agree on it at step boundaries (one all-reduce), checkpoint, and exit. Under SLURM rank 0
    then requeues the job.

    A launcher killed on its own (``timeout``, a container stop, ``kill`` of the deepspeed
    runner) does not always take its ranks along; they would train on, holding accelerators,
    with no checkpoint. Each rank therefore watches its launcher ancestors."""

    def __init__(self):
        self.flag = False
        self.requeue = False  # only USR1 (SLURM's warning) asks for a requeue; scancel sends TERM
        self.launchers = D.launcher_chain()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True
        self.requeue = self.requeue or signum == signal.SIGUSR1

    def agreed(self) -> bool:
        if not self.flag and not D.launcher_alive(self.launchers):
            print(f"rank {D.rank()}: the launcher exited; checkpointing and stopping", file=sys.stderr, flush=True)
            self.flag = True
        return bool(D.all_reduce(torch.tensor([int(self.flag)]), "max")[0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dissect_ds.train",
        description="Train a CLIP model with DeepSpeed and online DISSect sample selection.",
        epilog="Overrides: any config key as key=value, e.g. train.steps=100 selection.strategy=dissect_warmup "
        "selection.rate=0.3 deepspeed.zero_stage=3 resume=latest. Launch with deepspeed, torchrun, srun or mpirun.",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config and overrides for this launch's world size, print the resolved config, start nothing",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def micro_splits(kept_per_rank: list[int], accum: int, rank: int) -> list[tuple[torch.Tensor, list[int]]]:
    """How a step's k kept rows are trained in ``accum`` micro-batches: for each, this
    rank's rows (indices into its kept rows) and every rank's row count. Kept row g
    (numbered over the ranks in rank order) goes to micro-batch g % accum, so every
    micro-batch holds k // accum rows or one more, each rank's share as even; every rank
    knows every count, so no collective is needed."""
    offsets = [sum(kept_per_rank[:r]) for r in range(len(kept_per_rank))]
    out = []
    for m in range(accum):
        sizes = [len(range((m - off) % accum, n, accum)) for off, n in zip(offsets, kept_per_rank)]
        out.append((torch.arange(kept_per_rank[rank])[(m - offsets[rank]) % accum :: accum], sizes))
    return out


class Trainer:
    # How each checkpointed component survives a change of world size (see dissect_ds/checkpoint.py).
    KINDS = {"train": ckpt.REPLICATED, "selection": ckpt.SHARDED, "data": ckpt.SHARDED, "rng": ckpt.PER_RANK}

    def __init__(self, cfg: C.Config, info: D.DistInfo, preemption: Preemption | None = None):
        from dissect_ds.data import build_train_stream, dataset_size
        from dissect_ds.engine import Engine, device
        from dissect_ds.metrics import MetricsWriter, StepTimer
        from dissect_ds.selection import Selector
        from dissect_ds.selection.strategies import strategy_class

        self.cfg, self.info = cfg, info
        self.run_dir = cfg.run_dir
        torch.manual_seed(cfg.run.seed + info.rank)
        self.engine = Engine(cfg, info)
        num_samples, num_uids = dataset_size(cfg.data.train)
        t = cfg.train
        self.micro_batch = t.batch_size // (info.world_size * t.grad_accum)
        self.steps_per_epoch = max(1, cfg.data.epoch_samples(num_samples) // t.batch_size)
        # Loaded at start-up (collective): a bad file fails now, not after the warm-up, and
        # the data workers must know whether it needs inputs of its own.
        needs_reference = strategy_class(cfg.selection.strategy).needs_reference(cfg.selection)
        self.reference = self.engine.reference_model() if needs_reference else None
        self.selector = Selector(
            cfg.selection,
            num_uids=num_uids,
            rank=info.rank,
            world_size=info.world_size,
            device=device(),
            seed=cfg.run.seed,
            steps_per_epoch=self.steps_per_epoch,
            run_dir=str(self.run_dir),
            make_historical=self.engine.historical_model,
            reference=self.reference,
        )
        self.state = TrainState()
        self.checkpoints = ckpt.Checkpoints(cfg, info.rank, info.world_size)
        restored: dict = {}
        resume = ckpt.resolve_resume(cfg)
        if resume is not None:
            restored = self.checkpoints.restore(resume, self.engine, self.KINDS)
            self.state = TrainState(**restored["train"])
            self.selector.load_state_dict(restored["selection"])
            if restored["rng"] is not None:
                TorchRNG.restore(restored["rng"])
        elif cfg.resume == "latest" and info.is_main:
            print(f"resume=latest: no checkpoint in {self.run_dir / 'checkpoints'}, starting fresh", flush=True)
        self.stream = build_train_stream(
            cfg.data,
            seed=cfg.run.seed,
            rank=info.rank,
            world_size=info.world_size,
            batch_size=self.micro_batch,
            preprocess=self.engine.preprocess_train,
            tokenizer=self.engine.tokenizer,
            state=restored.get("data"),
            draft_size=max(self.engine.image_size, self.reference.image_size if self.reference else 0),
            reference=self.reference.inputs if self.reference else None,
        )
        if info.is_main:
            # config.yaml is the config of the latest start; every start's is kept beside it.
            C.dump(cfg, self.run_dir / "config.yaml")
            C.dump(cfg, self.run_dir / "configs" / f"start_step{self.state.step:08d}.yaml")
        self.writer = MetricsWriter(
            self.run_dir, info.is_main, cfg.log.tensorboard, resume_step=self.state.step if resume else None
        )
        self.timer = StepTimer()
        self.preemption = preemption or Preemption()
        if info.is_main and resume is not None:
            print(f"resumed from {resume} at step {self.state.step}", flush=True)

    def fit(self) -> dict[str, float]:
        from tqdm import tqdm

        from dissect_ds.engine import Diverged
        from dissect_ds.evaluate import wanted

        cfg, state = self.cfg, self.state
        batches = iter(self.stream)
        bar = tqdm(
            total=cfg.train.steps,
            initial=state.step,
            disable=not (self.info.is_main and cfg.log.progress),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
            mininterval=2.0,
        )
        while state.step < cfg.train.steps:
            t0 = time.perf_counter()
            try:
                values = self.train_step(batches)
            except Diverged as e:
                raise Diverged(f"step {state.step + 1}: {e}") from None
            values["time/step"] = time.perf_counter() - t0
            values["samples/s"] = cfg.train.batch_size / values["time/step"]
            state.step += 1
            done = state.step == cfg.train.steps
            if state.step % self.steps_per_epoch == 0:
                values.update(self.selector.epoch_end(state.step // self.steps_per_epoch - 1))
            if state.step % cfg.log.every_steps == 0 or done:
                values.update(self.data_counters())
                if self.info.is_main:
                    bar.write(self.log_line(values))
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and not done and wanted(cfg):
                values.update(self.evaluate())
            self.writer.log(state.step, values)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", sel=values.get("selected"), refresh=False)
            preempted = self.preemption.agreed()
            if preempted or done or (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0):
                try:
                    self.save()
                except Diverged as e:
                    raise Diverged(f"step {state.step}: {e}") from None
            if preempted:
                self.on_preempted()
                raise Preempted
        bar.close()
        final = self.evaluate() if wanted(cfg) else {}
        self.writer.log(state.step, final)
        if self.info.is_main:
            (self.run_dir / "eval.json").write_text(json.dumps({"step": state.step, **final}, indent=2))
        self.engine.export_open_clip(self.run_dir / "open_clip_model.pt", self.run_dir / "open_clip")
        self.writer.close()
        return final

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step: its ``grad_accum`` micro-batches are scored, one top-k is
        taken over the whole global batch, and the kept rows are trained in ``grad_accum``
        micro-batches (the same selection however the batch is split)."""
        cfg, state = self.cfg, self.state
        accum = cfg.train.grad_accum
        with self.timer("data"):
            parts = [next(batches) for _ in range(accum)]
        batch = type(parts[0]).cat(parts) if accum > 1 else parts[0]
        selection = self.selector.select(state.step, batch, self.encode, micro_size=len(parts[0]))
        kept = batch.select(selection.mask)
        totals: dict[str, float] = {}
        for rows, sizes in micro_splits(selection.kept_per_rank, accum, self.info.rank):
            with self.timer("train"):
                out = self.engine.train_step(kept.select(rows), fallback=batch, sizes=sizes)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        totals.update(selection.metrics)
        every = cfg.log.histograms_every_steps
        if self.info.is_main and every and state.step % every == 0:
            for name, values in selection.histograms.items():
                self.writer.histogram(state.step, name, values)
        state.samples_seen += cfg.train.batch_size
        state.selected_seen += selection.num_selected
        # Once per optimizer step (the update ran in the last micro-batch's train_step):
        # snapshot, refresh and EMA schedules count optimizer steps.
        self.selector.after_step(state.step)
        totals.update(self.timer.pop())
        totals["grad_norm"] = self.engine.grad_norm()
        self.engine.check_finite_step(totals["grad_norm"])
        totals["samples_seen"] = state.samples_seen
        totals["selected_seen"] = state.selected_seen
        totals["epoch"] = state.step / self.steps_per_epoch
        if torch.cuda.is_available():
            totals["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return totals

    def encode(self, batch) -> Features:
        """The scoring forward over a step's rows, one micro-batch at a time (no gradient:
        only the features are kept, so activation memory stays that of one micro-batch)."""
        from dissect_ds.model import Features

        n = self.micro_batch
        chunks = [batch.select(torch.arange(i, min(i + n, len(batch)))) for i in range(0, len(batch), n)]
        return Features.cat([self.engine.encode(c) for c in chunks])

    def data_counters(self) -> dict[str, int]:
        counts = self.stream.skip_counts()
        keys = sorted(counts)
        summed = D.all_reduce(torch.tensor([counts[k] for k in keys], dtype=torch.long), "sum")
        return {f"data/skipped_{k}": int(v) for k, v in zip(keys, summed)}

    def log_line(self, v: dict) -> str:
        parts = [f"step {self.state.step}/{self.cfg.train.steps}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.2e}"]
        parts.append(f"selected {int(v.get('selected', 0))}/{self.cfg.train.batch_size}")
        if "selection/rank_corr_d_c" in v:  # label-free: strongly negative = keeps what the model scores worst
            parts.append(f"corr(d,c) {v['selection/rank_corr_d_c']:+.2f}")
        if "selection/clean_precision" in v:
            parts.append(f"clean {v['selection/clean_precision']:.3f}")
        parts.append(f"{v['samples/s']:.0f} samples/s")
        return " | ".join(parts)

    def evaluate(self) -> dict[str, float]:
        from dissect_ds.evaluate import evaluate_run
        from dissect_ds.evaluation import EngineEncoder

        metrics = evaluate_run(
            EngineEncoder(self.engine),
            self.cfg.data,
            self.cfg.eval,
            self.info.rank,
            self.info.world_size,
            progress=self.info.is_main and self.cfg.log.progress,
        )
        if self.info.is_main:
            from tqdm import tqdm

            tqdm.write(
                f"eval @ step {self.state.step}: "
                + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if "R@5" not in k),
                file=sys.stdout,
            )
        return metrics

    def save(self) -> None:
        components = {"train": self.state, "data": self.stream, "selection": self.selector, "rng": TorchRNG()}
        self.checkpoints.save(self.state.step, self.engine, components)

    def on_preempted(self) -> None:
        self.writer.close()
        job = os.environ.get("SLURM_JOB_ID")
        if self.info.is_main:
            print(f"preempted: checkpoint at step {self.state.step} written", flush=True)
            if job and self.preemption.requeue and os.environ.get("DISSECT_REQUEUE", "1") == "1":
                subprocess.run(["scontrol", "requeue", job], check=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preemption = Preemption()  # before anything slow: USR1's default action kills the process
    # Rank 0 shows the package's info lines (e.g. the data layer counting shards without a
    # manifest); the other ranks only warnings, so a line is not printed W times.
    main_rank = D.env_from_launcher()["RANK"] == "0"
    package_log = logging.getLogger("dissect_ds")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.propagate = False
    package_log.setLevel(logging.INFO if main_rank else logging.WARNING)
    world = int(D.env_from_launcher()["WORLD_SIZE"])
    cfg = C.load_or_exit(args.config, args.overrides, world_size=world)
    if args.check:
        if main_rank:
            import yaml

            print(yaml.safe_dump(C.to_dict(cfg), sort_keys=False), end="")
            print(f"config ok for world size {world}: {cfg.run_dir}", file=sys.stderr)
        return 0
    lock = RunLock(cfg.run_dir)
    if main_rank:
        try:
            lock.acquire()  # before the process group: a refused rank 0 makes its launcher stop the rest
        except RunDirBusy as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    try:
        return _train(cfg, preemption)
    finally:
        lock.release()


def _train(cfg: C.Config, preemption: Preemption) -> int:
    from dissect_ds.engine import Diverged, init_distributed

    info = init_distributed()
    trainer = Trainer(cfg, info, preemption)
    try:
        trainer.fit()
    except Preempted:
        code = EXIT_PREEMPTED
    except Diverged as e:
        # Every rank raises at the same step (the loss and gradient norm are global).
        if info.is_main:
            print(
                f"error: training diverged at {e}; stopped without writing a checkpoint or "
                f"export of it (lower train.lr, raise train.warmup_steps or set train.grad_clip, then "
                f"resume=latest from the last good checkpoint)",
                file=sys.stderr,
                flush=True,
            )
        trainer.writer.close()
        code = EXIT_DIVERGED
    except ckpt.CheckpointError as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        trainer.writer.close()
        code = 1
    else:
        code = 0
    D.barrier()
    if D.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
