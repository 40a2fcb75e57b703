"""The training run: components assembled once, then ``run() -> train_step()`` counting optimizer steps.

Checkpoints, metrics and evaluation happen between steps. SIGTERM / SIGUSR1 (preemption, time limit)
make the run checkpoint and exit with :data:`EXIT_REQUEUE`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import dinat
import dinat.flops

from .checkpoint import Checkpointer
from .config import Config, ConfigError, resolve_batch, save_config
from .data.build import eval_stream, make_synthetic_if_requested, resolve_dataset, train_augment, train_stream
from .data.loader import StreamPosition, build_loader
from .data.plan import Layout, Origin
from .data.resume import continue_from, job_state
from .data.transforms import DeviceAugment
from .distributed import DistInfo, job_identity
from .engine import PRECISION_DTYPES, Schedule, build_engine, resolve_precision
from .evaluate import evaluate
from .lifecycle import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, Lifecycle
from .metrics import Metrics, StepTimer, mfu, peak_flops
from .resume import plan_resume, reseed
from .run_claim import RunClaim, RunDirBusy

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def prepare_run_dir(path: str, info: DistInfo) -> tuple[Path, RunClaim | None]:
    """Create the run directory, claim it for this job (rank 0; see :mod:`pipeline.run_claim`) and check that
    every rank can write there and sees what rank 0 writes (checkpoints are written by all ranks and read back
    by all: on several nodes it must be a shared filesystem, not a node-local /tmp). All ranks fail alike, with
    the first rank's reason. Returns (directory, rank 0's claim)."""
    run_dir = Path(path)
    error, claim = "", None
    token = [uuid.uuid4().hex]
    if info.world_size > 1:
        dist.broadcast_object_list(token, src=0)
    marker = run_dir / f".shared-check-{token[0]}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            claim = RunClaim(run_dir, job_identity())
            claim.acquire()
        probe = run_dir / f".write-test-{info.rank}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        if info.is_main:
            marker.write_text(token[0])
    except OSError as e:
        error = f"run.output_dir: {run_dir} is not writable ({e.strerror})"
    except RunDirBusy as e:
        error = str(e)
    info.barrier()
    if not error and not marker.is_file():
        error = (
            f"run.output_dir: {run_dir} is not shared between ranks: rank {info.rank} does not see the file "
            "rank 0 wrote there; use a directory every node mounts (not a node-local /tmp)"
        )
    errors = [error]
    if info.world_size > 1:
        errors = [None] * info.world_size
        dist.all_gather_object(errors, error)
    info.barrier()
    if info.is_main:
        marker.unlink(missing_ok=True)
    if any(errors):
        if claim is not None and claim.path.is_file():
            claim.release()
        raise ConfigError(next(e for e in errors if e))
    return run_dir, claim


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, life: Lifecycle):
        self.cfg, self.info, self.life = cfg, info, life
        # Everything a configuration can get wrong is checked before the run directory is touched.
        make_synthetic_if_requested(cfg.data, info)
        self.dataset = resolve_dataset(cfg.data, info)
        self.micro, self.accum, self.global_batch = resolve_batch(cfg.train, info.world_size)
        self.total_steps, self.schedule = self._plan_steps()
        self.val_stream = eval_stream(cfg.data, self.dataset, info, self.micro) if self.dataset.val else None
        self.precision = resolve_precision(cfg.train.precision, info.device)
        if cfg.run.push_to:  # fail now, not after the last step
            from .export import hub_token

            try:
                hub_token(cfg.run.push_to)
            except ValueError as e:
                raise ConfigError(f"run.push_to: {e}") from None
        self.run_dir, self.claim = prepare_run_dir(cfg.run.output_dir, info)
        if self.claim is not None:
            self.claim.on_lost = lambda message: self.life.fail(EXIT_FAILURE, message)
            self.life.on_exit(self.claim.release)
        if info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.model = self._build_model()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.train.keep_checkpoints, info)
        stage = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
        self.resuming = plan_resume(cfg.run.resume, self.checkpointer, self.model, info, stage)
        universal = self.resuming is not None and self.resuming.universal
        self.engine, _, self.scheduler = build_engine(
            cfg, self.model, info, self.micro, self.accum, self.global_batch, self.schedule, universal
        )
        dtype = PRECISION_DTYPES[self.precision]
        self.augment = train_augment(cfg.data, self.dataset.num_classes, info.device, dtype)
        self.eval_augment = DeviceAugment(self.dataset.num_classes, info.device, training=False, dtype=dtype)
        self.metrics = Metrics(self.run_dir / "tensorboard", info, enabled=cfg.run.tensorboard)
        self.step, self.samples_seen, self.nonfinite, self.nonfinite_total = 0, 0, 0, 0
        self.layout = Layout(info.world_size, max(cfg.data.workers, 1), self.micro)
        self.position = StreamPosition(cfg.data.mode, self.layout)
        self._data_state = None  # this rank's stream positions (a resume on the same layout)
        self._origin, self._generation = Origin(), 0  # where the data plan starts (after a resume on another one)
        self._rng_to_restore = None
        self._saved_step: int | None = None
        flops = dinat.flops.train_step_flops(self.model.config, cfg.data.image_size, self.global_batch)
        self.useful_flops_per_step = flops["useful"]
        self.peak = peak_flops(info.device, dtype)

    # -- setup ----------------------------------------------------------------------------------------
    def _plan_steps(self) -> tuple[int, Schedule]:
        t, o = self.cfg.train, self.cfg.optim
        per_epoch = self.dataset.train_samples
        if t.steps is None and per_epoch is None:
            raise ConfigError("train.epochs: needs per-shard sample counts (data.manifest); or set train.steps")
        steps = t.steps or max(1, math.ceil(t.epochs * per_epoch / self.global_batch))
        if o.warmup_steps is not None:
            warmup = o.warmup_steps
        else:
            warmup = round(o.warmup_epochs * per_epoch / self.global_batch) if per_epoch else 0
        if warmup >= steps:
            raise ConfigError(f"optim.warmup: {warmup} warmup steps >= {steps} training steps")
        lr = o.lr if o.lr is not None else o.base_lr * self.global_batch / o.base_batch_size
        return steps, Schedule(lr, min(o.min_lr, lr), warmup, steps)

    def _build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        overrides = dict(
            m.dinat_fields(),
            num_labels=self.dataset.num_classes,
            id2label={c["index"]: c["name"] for c in self.dataset.classes},
        )
        if m.init_from:
            overrides.pop("num_labels")
            model = dinat.DinatForImageClassification.from_pretrained(m.init_from, **overrides)
        else:
            model = dinat.create_model(m.name, device=self.info.device, **overrides)
        logger.info(
            "%s: %.1fM parameters, attention backend %s", m.name, model.num_parameters / 1e6, model.attention_backend
        )
        return model.to(self.info.device)

    def resume(self) -> None:
        """Load the checkpoint chosen at start-up (:func:`pipeline.resume.plan_resume`), if any."""
        r = self.resuming
        if r is None:
            return
        state, rank_state = self.checkpointer.load(self.engine, r.path, universal=r.universal)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        d = self.cfg.data
        if "data" in state:
            seed = self.cfg.train.seed
            go = continue_from(state["data"], self.dataset.train, self.layout, d.mode, d.shuffle_buffer, seed)
            self._origin, self._generation, summary = go.origin, go.generation, go.summary
            same = go.same_layout
        elif rank_state is not None:  # written before checkpoints held the whole job's data position
            same, summary = True, "each stream continues where it stopped"
        else:
            raise ConfigError(f"run.resume: {r.path} has no job-wide data position; resume it on its own world size")
        if same:
            self._data_state = rank_state["data"]
            self.position.load_state_dict(rank_state["data"])
            self._rng_to_restore = rank_state["rng"]  # after the data iterator exists (see _batches)
        else:
            self.position.before = (state["data"]["skipped"], state["data"]["seen"])
            reseed(self.cfg.train.seed, self.step, self.info.rank)
        text = r.describe(self.info, summary)
        logger.info("%s", text)
        self.metrics.text(self.step, "train/resume", text)

    # -- the loop -------------------------------------------------------------------------------------
    def _batches(self):
        """Training batches forever (epoch mode: epoch after epoch, one endless stream), tracking the position."""
        stream = train_stream(self.cfg.data, self.dataset, self.info, self.micro, self.cfg.train.seed, self._data_state,
                              self._origin, self._generation)  # fmt: skip
        iterator = iter(build_loader(stream, pin_memory=self.info.device.type == "cuda"))
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        for batch in iterator:
            self.position.update(batch["meta"])
            yield batch

    def run(self) -> int:
        self.resume()
        batches = self._batches()
        self.life.training()  # a stop signal now checkpoints; before, it ended the start-up at once
        timer = StepTimer(torch.cuda.synchronize if self.info.device.type == "cuda" else None)
        window: list[float] = []
        bar = self._progress_bar()
        self.metrics.hparams(self.cfg.to_dict(), {"eval/top1": None, "eval/top5": None, "eval/loss": None})
        while self.step < self.total_steps:
            loss = self.train_step(batches, timer)
            window.append(loss)
            if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
                self._log(window, timer)
                window = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if self.val_stream is not None and self.step % self.cfg.train.eval_every == 0:
                self._evaluate()
            if self._stop_requested():
                logger.warning("stop signal received: checkpointing at step %d", self.step)
                self.save()
                self.life.finishing()
                logger.warning("stopped by signal at step %d; exit %d to be requeued", self.step, EXIT_REQUEUE)
                self._close()
                return EXIT_REQUEUE
            if self.step % self.cfg.train.checkpoint_every == 0:
                self.save()
            timer.step_start()  # eval and checkpoint time is not step time
        if self.val_stream is not None and self.step % self.cfg.train.eval_every:
            self._evaluate()
        final = self.checkpointer.latest() if self._saved_step == self.step else self.save()
        if self.cfg.run.export and self.info.is_main:
            from .export import export_checkpoint

            out = export_checkpoint(final, self.run_dir / "export", push_to=self.cfg.run.push_to)
            logger.info("exported %s", out)
        self.life.finishing()
        self.info.barrier()
        self._close()
        logger.info("done: %d steps; TensorBoard logs in %s", self.step, self.run_dir / "tensorboard")
        return EXIT_OK

    def _close(self) -> None:
        self.metrics.close()
        if self.claim is not None:
            self.claim.release()

    def train_step(self, batches, timer) -> float:
        """One optimizer step over ``accum`` micro-batches; returns the mean loss (all ranks)."""
        losses = []
        while len(losses) < self.accum:
            timer.fetch_start()
            batch = next(batches)
            timer.data_ready()
            if self.step == 0 and not losses and self.cfg.run.image_grid:
                self.metrics.images(0, "train/augmented_inputs", batch["images"][:32])
            x, y = self.augment(batch["images"], batch["labels"])
            loss = self.engine(x, labels=y).loss
            if not self._all_finite(loss):
                self._skip_nonfinite(loss)
                continue
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        self.nonfinite = 0
        self.step += 1
        self.samples_seen += self.global_batch
        mean = torch.stack(losses).mean()
        if self.info.world_size > 1:
            dist.all_reduce(mean)
            mean /= self.info.world_size
        timer.step_done()
        return mean.item()

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if self.info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        self.nonfinite += 1
        self.nonfinite_total += 1
        logger.warning(
            "non-finite loss (%s) at step %d: micro-batch skipped (%d in a row)", loss.item(), self.step, self.nonfinite
        )
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite} non-finite losses in a row at step {self.step} "
                f"(train.max_nonfinite); last checkpoint: {self.checkpointer.latest()}"
            )

    def _stop_requested(self) -> bool:
        flag = torch.tensor([self.life.stop_signal], dtype=torch.int32)
        if self.info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- between steps --------------------------------------------------------------------------------
    def _log(self, window: list[float], timer) -> None:
        seconds, wait = timer.pop()
        steps = max(len(window), 1)
        ips = self.global_batch * steps / max(seconds, 1e-9)
        skipped = torch.tensor([self.position.skipped], dtype=torch.int64)
        if self.info.world_size > 1:
            dist.all_reduce(skipped)
        values = {
            "train/loss": sum(window) / steps,
            "train/lr": self.schedule.lr(self.step - 1),  # the rate the last step used
            "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "perf/images_per_sec": ips,
            "perf/images_per_sec_per_gpu": ips / self.info.world_size,
            "perf/data_wait_fraction": wait / max(seconds, 1e-9),
            "mem/peak_gib": peak_memory_gib(self.info.device),
            "data/skipped_samples": float(skipped.item()),
            "train/nonfinite_skipped": float(self.nonfinite_total),
        }
        util = mfu(self.useful_flops_per_step * steps, seconds, self.info.world_size, self.peak)
        if util is not None:
            values["perf/mfu"] = util
        self.metrics.scalars(self.step, values)
        logger.info(
            "step %d/%d loss %.4f lr %.3g grad %.3g | %.1f img/s, data wait %.0f%%",
            self.step,
            self.total_steps,
            values["train/loss"],
            values["train/lr"],
            values["train/grad_norm"],
            ips,
            100 * values["perf/data_wait_fraction"],
        )

    def _evaluate(self) -> dict[str, float]:
        loader = build_loader(self.val_stream, pin_memory=self.info.device.type == "cuda")
        planned = self.val_stream.batches_per_rank()
        batches = min(planned, self.cfg.train.eval_batches or planned)
        results = evaluate(
            self.engine, loader, self.eval_augment, self.info.device, batches, self.cfg.data.image_size,
            whole=batches == planned,
        )  # fmt: skip
        self.metrics.scalars(self.step, results)
        logger.info(
            "eval at step %d: loss %.4f top-1 %.2f%% top-5 %.2f%% (%d images)",
            self.step,
            results["eval/loss"],
            results["eval/top1"],
            results["eval/top5"],
            results["eval/samples"],
        )
        return results

    def save(self) -> Path:
        if not self._params_finite():
            raise NonFiniteLossError(
                f"non-finite parameters at step {self.step}: not checkpointing; "
                f"last checkpoint: {self.checkpointer.latest()}"
            )
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "world_size": self.info.world_size,
            "config": self.cfg.to_dict(),
            "dinat_config": self.model.config.to_dict(),
            "classes": self.dataset.classes,
            "image_size": self.cfg.data.image_size,
            "nonfinite_total": self.nonfinite_total,
        }
        rank_state = {"data": self.position.state_dict(), "rng": rng_state()}
        state["data"] = self._job_data_state(rank_state["data"])
        path = self.checkpointer.save(self.engine, self.step, state, rank_state)
        self._saved_step = self.step
        logger.info("checkpoint %s", path)
        return path

    def _job_data_state(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Every slot's position, gathered from all ranks (a small record: two ints per slot)."""
        per_rank = [mine]
        if self.info.world_size > 1:
            per_rank = [None] * self.info.world_size
            dist.all_gather_object(per_rank, mine)
        d = self.cfg.data
        return job_state(per_rank, self.layout, mode=d.mode, seed=self.cfg.train.seed, window=d.shuffle_buffer,
                         shards=self.dataset.train, origin=self._origin, generation=self._generation)  # fmt: skip

    def _params_finite(self) -> bool:
        ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in self.engine.module.parameters())
        return self._all_finite(torch.tensor(0.0 if ok else float("nan")))

    def _progress_bar(self):
        if not (self.info.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
