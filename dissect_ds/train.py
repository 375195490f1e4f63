"""Entry point: ``python -m dissect_ds.train --config configs/debug.yaml key=value ...``.

Works as a single process and under the deepspeed launcher, torchrun, srun and mpirun.
The loop: data -> score -> select -> step -> log -> maybe eval -> maybe save.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from dissect_ds import config as C
from dissect_ds import distributed as D


@dataclass
class TrainState:
    """Everything besides model/optimizer/history that an exact resume needs."""

    step: int = 0
    samples_seen: int = 0
    selected_seen: int = 0


class Preemption:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it at step boundaries (one all-reduce),
    checkpoint, and exit. Under SLURM rank 0 then requeues the job."""

    def __init__(self):
        self.flag = False
        self.requeue = False  # only USR1 (SLURM's warning) asks for a requeue; scancel sends TERM
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True
        self.requeue = self.requeue or signum == signal.SIGUSR1

    def agreed(self) -> bool:
        return bool(D.all_reduce(torch.tensor([int(self.flag)]), "max")[0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dissect_ds.train",
        description="Train a CLIP model with DeepSpeed and online DISSect sample selection.",
        epilog="Overrides: any config key as key=value, e.g. train.steps=100 selection.strategy=dissect_warmup "
        "selection.rate=0.3 deepspeed.zero_stage=3 resume=latest. Launch with deepspeed, torchrun, srun or mpirun.",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


class Trainer:
    def __init__(self, cfg: C.Config, info: D.DistInfo, preemption: Preemption | None = None):
        from dissect_ds.data import build_train_stream, dataset_size
        from dissect_ds.engine import Engine, resolve_resume
        from dissect_ds.metrics import MetricsWriter, StepTimer
        from dissect_ds.selection import Selector

        self.cfg, self.info = cfg, info
        self.run_dir = cfg.run_dir
        torch.manual_seed(cfg.run.seed + info.rank)
        self.engine = Engine(cfg, info)
        num_samples, num_uids = dataset_size(cfg.data.train)
        t = cfg.train
        self.micro_batch = t.batch_size // (info.world_size * t.grad_accum)
        self.steps_per_epoch = max(1, num_samples // t.batch_size)
        self.selector = Selector(
            cfg.selection,
            num_uids=num_uids,
            rank=info.rank,
            world_size=info.world_size,
            device=self.engine_device(),
            seed=cfg.run.seed,
            steps_per_epoch=self.steps_per_epoch * t.grad_accum,
            run_dir=str(self.run_dir),
            make_historical=self.engine.historical_model,
        )
        self.state = TrainState()
        data_state = None
        resume = resolve_resume(cfg)
        if resume is not None:
            states = self.engine.load(resume)
            mine = states[info.rank] if len(states) == info.world_size else states[0]
            self.state = TrainState(**mine["train"])
            data_state = mine["data"] if len(states) == info.world_size else None
            self.selector.load_state_dict([s["selection"] for s in states])
            if len(states) == info.world_size:
                torch.set_rng_state(mine["rng"])
        self.stream = build_train_stream(
            cfg.data,
            seed=cfg.run.seed,
            rank=info.rank,
            world_size=info.world_size,
            batch_size=self.micro_batch,
            preprocess=self.engine.preprocess_train,
            tokenizer=self.engine.tokenizer,
            state=data_state,
        )
        if info.is_main:
            C.dump(cfg, self.run_dir / "config.yaml")
        self.writer = MetricsWriter(
            self.run_dir, info.is_main, cfg.log.tensorboard, resume_step=self.state.step if resume else None
        )
        self.timer = StepTimer()
        self.preemption = preemption or Preemption()
        if info.is_main and resume is not None:
            print(f"resumed from {resume} at step {self.state.step}", flush=True)

    @staticmethod
    def engine_device():
        from dissect_ds.engine import device

        return device()

    def fit(self) -> dict[str, float]:
        from tqdm import tqdm

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
            values = self.train_step(batches)
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
                self.save()
            if preempted:
                self.on_preempted()
                return {}
        bar.close()
        final = self.evaluate() if wanted(cfg) else {}
        self.writer.log(state.step, final)
        if self.info.is_main:
            (self.run_dir / "eval.json").write_text(json.dumps({"step": state.step, **final}, indent=2))
        self.engine.export_open_clip(self.run_dir / "open_clip_model.pt", self.run_dir / "open_clip")
        self.writer.close()
        return final

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step: ``grad_accum`` micro-batches, each scored, selected, trained."""
        cfg, state = self.cfg, self.state
        totals: dict[str, float] = {}
        for micro in range(cfg.train.grad_accum):
            with self.timer("data"):
                batch = next(batches)
            step_id = state.step * cfg.train.grad_accum + micro
            selection = self.selector.select(step_id, batch, self.engine.encode)
            with self.timer("train"):
                out = self.engine.train_step(batch.select(selection.mask), fallback=batch, sizes=selection.sizes)
            self.selector.after_step(step_id)
            for k, v in {**out, **selection.metrics}.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.train.grad_accum
            if self.info.is_main and cfg.log.histograms_every_steps and step_id % cfg.log.histograms_every_steps == 0:
                for name, values in selection.histograms.items():
                    self.writer.histogram(state.step, name, values)
            state.samples_seen += cfg.train.batch_size // cfg.train.grad_accum
            state.selected_seen += selection.num_selected
        totals["selected"] = totals.get("selected", 0.0) * cfg.train.grad_accum
        totals.update(self.timer.pop())
        totals["grad_norm"] = self.engine.grad_norm()
        totals["samples_seen"] = state.samples_seen
        totals["selected_seen"] = state.selected_seen
        totals["epoch"] = state.step / self.steps_per_epoch
        if torch.cuda.is_available():
            totals["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return totals

    def data_counters(self) -> dict[str, int]:
        counts = self.stream.skip_counts()
        keys = sorted(counts)
        summed = D.all_reduce(torch.tensor([counts[k] for k in keys], dtype=torch.long), "sum")
        return {f"data/skipped_{k}": int(v) for k, v in zip(keys, summed)}

    def log_line(self, v: dict) -> str:
        parts = [f"step {self.state.step}/{self.cfg.train.steps}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.2e}"]
        parts.append(f"selected {int(v.get('selected', 0))}/{self.cfg.train.batch_size}")
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
        rank_state = {
            "train": asdict(self.state),
            "data": self.stream.state_dict(),
            "selection": self.selector.state_dict(),
            "rng": torch.get_rng_state(),
            "world_size": self.info.world_size,
        }
        self.engine.save(
            self.run_dir / "checkpoints", f"step{self.state.step:08d}", rank_state, self.cfg.checkpoint.keep
        )

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
    world = int(D.env_from_launcher()["WORLD_SIZE"])
    cfg = C.load_or_exit(args.config, args.overrides, world_size=world)
    from dissect_ds.engine import init_distributed

    info = init_distributed()
    trainer = Trainer(cfg, info, preemption)
    trainer.fit()
    D.barrier()
    if D.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
