"""The staged t-SimCNE trainer: 128-D pre-training, 2-D last layer only, full fine-tune.

All randomness of a step (the epoch's permutation, the augmentations, the stage-2 layer init) comes
from generators seeded by (seed, stage, epoch, step, rank), not from a global stream. A run therefore
continues from any saved position (even mid-epoch, after Ctrl-C) and reaches the same weights as a run
that was never interrupted, on the same hardware and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm  # a notebook-aware bar in Jupyter, the usual one in a terminal

from training.augment import BatchAugmenter, get_preset, mean_border_colour
from training.batches import image_source
from training.budget import BudgetPlan, epochs_for_budget, replan, replan_remaining
from training.checkpoint import save_checkpoint
from training.config import TrainConfig
from training.data import ImageDataset
from training.device import Runtime
from training.distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier
from training.flops import forward_flops_per_image, training_flops_per_image
from training.global_batchnorm import use_global_batchnorm
from training.loss import InfoNCELoss
from training.network import build_model
from training.schedule import effective_warmup_epochs, learning_rate
from tsimcne_core.errors import UserError
from tsimcne_core.files import atomic_write_json, atomic_write_text

STAGE_NAMES = {1: "pre-train (128-D)", 2: "2-D output layer", 3: "fine-tune all"}
STOP_CHECK_STEPS = 10
# Progress messages (stage starts, epoch lines): the CLI shows INFO on stdout and WARNING on stderr; a
# Python caller sees them through logging or passes its own `echo`.
logger = logging.getLogger("tsimcne")


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (same on every machine and Python version)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(*parts))
    return generator


@dataclass
class Position:
    """Where training continues: stage 1-3 (4 = finished), epochs done in it, steps done in that epoch."""

    stage: int = 1
    epoch: int = 0
    step: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"stage": self.stage, "epoch": self.epoch, "step": self.step}

    def before(self, stage: int, epoch: int) -> bool:
        """True if epoch (stage, epoch) was finished before this position."""
        return (stage, epoch) < (self.stage, self.epoch)


class StopRequested(Exception):
    """Raised after Ctrl-C / SIGTERM once the checkpoint is safely written."""


class _SignalGuard:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing this step and saving a checkpoint (press again to abort)")

    def __enter__(self) -> _SignalGuard:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: no signal handling
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainSummary:
    run_dir: Path
    seconds: float
    final_loss: float | None
    position: Position
    stopped_early: bool


@dataclass
class _Stage:
    """What every epoch of a stage uses: the module a step calls, the optimiser and the step schedule."""

    stage: int
    epochs: int
    batch_local: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    base_lr: float
    steps_per_epoch: int
    warmup_steps: int
    flops_per_image: float


@dataclass
class _EpochDone:
    mean_loss: torch.Tensor  # this process's mean step loss (averaged over processes when finishing)
    images_seen: int
    lr: float  # the last step's learning rate
    seconds: float
    stop: bool  # a stop was requested at the epoch's last step
    steady_step_s: float  # seconds a step after the epoch's first WARM_STEPS (allocator, kernel caches)


WARM_STEPS = 2  # steps of an epoch left out of its steady step time


def _steps_per_epoch(n_local: int, batch_local: int) -> int:
    full, rest = divmod(n_local, batch_local)
    return full + (1 if rest >= 2 else 0)  # a last batch needs 2 images to have negatives


class StagedTrainer:
    def __init__(
        self,
        config: TrainConfig,
        dataset: ImageDataset,
        run_dir: Path,
        runtime: Runtime,
        dist_info: DistInfo | None = None,
        resume_state: dict[str, Any] | None = None,
        show_progress: bool | None = None,
        echo: Callable[[str], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """show_progress: progress bars (None: when on a terminal); echo: where progress messages go
        (default: the "tsimcne" logger at INFO); on_epoch: called with each finished epoch's log record."""
        self.config = config
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.runtime = runtime
        dist_info = dist_info or DistInfo()
        self.dist = dist_info
        self.echo = (echo or logger.info) if dist_info.is_main else (lambda _msg: None)
        self.on_epoch = on_epoch if dist_info.is_main else None
        self.show_progress = show_progress if dist_info.is_main else False
        device = runtime.device
        self.source = image_source(dataset.images, device)  # on the device, or streamed (training/batches.py)
        self.fill = mean_border_colour(dataset.images)
        self.data_fingerprint = dataset.fingerprint()  # once: every checkpoint records it
        self.augment = BatchAugmenter(get_preset(config.augmentation), self.fill)
        self.loss_fn = InfoNCELoss(config.metric, config.temperature, gather_distributed=dist_info.enabled)
        torch.manual_seed(derived_seed(config.seed, "init"))
        self.model = build_model(config).to(device)
        self.forward_flops = forward_flops_per_image(self.model, dataset.size)
        self.position = Position()
        self.finished_stage = 0
        self.elapsed_before = 0.0
        self._optimizer_state: dict[str, Any] | None = None
        self._partial_loss: float | None = None
        self.budget_plan: BudgetPlan | None = None  # a new budgeted run: planned, then re-planned after epoch 1
        self._last_step_s: tuple[int, float] | None = None  # (stage, steady step time) of the last epoch run here
        if resume_state is not None:
            self._restore(resume_state)
        if dist_info.enabled and config.sync_bn:
            use_global_batchnorm(self.model)
        if runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------------------- state
    def _restore(self, state: dict[str, Any]) -> None:
        if state["dataset"]["fingerprint"] != self.data_fingerprint:
            raise UserError(
                f"the data at {self.config.data} differs from the data this run started with "
                "(fingerprint mismatch); resume with the same data or start a new run"
            )
        if state["model_out_dim"] != self.model.out_dim:
            self.model.to_map_output(state["model_out_dim"])
        self.model.load_state_dict(state["model"])
        self.position = Position(**state["position"])
        self.finished_stage = state["finished_stage"]
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self._optimizer_state = state.get("optimizer")
        self._partial_loss = state.get("partial_epoch_loss_sum")
        torch.set_rng_state(state["rng"]["torch"])

    def _state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "position": self.position.as_dict(),
            "finished_stage": self.finished_stage,
            "model": self.model.state_dict(),
            "model_out_dim": self.model.out_dim,
            "width": self.config.width,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "dataset": {
                "fingerprint": self.data_fingerprint,
                "n_images": len(self.dataset),
                "image_size": list(self.dataset.size),
                "class_names": list(self.dataset.class_names),
                "border_colour": list(self.fill),
                "source": self.dataset.source,
            },
            "rng": {"torch": torch.get_rng_state()},
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self._started),
            "torch_version": str(torch.__version__),
            "partial_epoch_loss_sum": self._partial_loss,
        }

    def _save(self, optimizer: torch.optim.Optimizer | None, stage_file: str | None = None) -> None:
        if not self.dist.is_main:
            return
        state = self._state(optimizer)
        save_checkpoint(self.run_dir / "last.pt", state)
        if stage_file:
            save_checkpoint(self.run_dir / stage_file, state)

    def _log_epoch(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _trim_log(self) -> None:
        """On resume, drop epochs logged after the checkpoint (the killed run may have logged more)."""
        path = self.run_dir / "log.jsonl"
        if not self.dist.is_main or not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if self.position.before(record["stage"], record["epoch"] - 1):
                kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    # -------------------------------------------------------------------------------------- training
    def _prepare_stage(self, stage: int) -> None:
        """Stage transitions (reference `mutate_model`): 2-D last layer at stage 2, trainability per stage."""
        config = self.config
        if stage >= 2 and self.model.out_dim != config.out_dim:
            generator = seeded_generator(torch.device("cpu"), config.seed, "stage2-layer")
            self.model.to_map_output(config.out_dim, generator=generator)
            self.model.head[-1].to(self.runtime.device)
        self.model.set_trainable(last_layer_only=stage == 2)
        self.model.train()

    def _stop_requested(self, guard: _SignalGuard, last_step: bool = False) -> bool:
        """A stop on any rank stops all ranks at the same step (otherwise collectives would hang).

        Under torchrun the ranks agree every STOP_CHECK_STEPS steps and at the end of each epoch: the
        agreement is a collective that waits for the GPU, so doing it every step would stall the queue.
        """
        if not self.dist.enabled:
            return guard.requested
        self._steps_since_check = getattr(self, "_steps_since_check", 0) + 1
        if not last_step and self._steps_since_check < STOP_CHECK_STEPS:
            return False
        self._steps_since_check = 0
        flag = torch.tensor([1.0 if guard.requested else 0.0], device=self.runtime.device)
        return bool(all_reduce_max(flag, self.dist).item())

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module a step calls: the network, under torchrun its DDP wrapper, compiled if asked."""
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.runtime.compile:
            model = torch.compile(model)
        return model

    def _epoch_batches(self, stage: int, epoch: int, batch_local: int) -> list[torch.Tensor]:
        n = len(self.dataset)
        generator = seeded_generator(torch.device("cpu"), self.config.seed, "perm", stage, epoch)
        order = torch.randperm(n, generator=generator)
        per_rank = n // self.dist.world_size
        shard = order[self.dist.rank :: self.dist.world_size][:per_rank]
        batches = list(torch.split(shard, batch_local))
        if len(batches[-1]) < 2:
            batches.pop()
        return batches

    def batch_sizes(self) -> tuple[int, int]:
        """(global batch, images per process): the configured batch, capped by the data."""
        n, world = len(self.dataset), self.dist.world_size
        global_batch = min(self.config.batch_size, (n // world) * world)
        batch_local = global_batch // world
        if batch_local < 2:
            raise UserError(f"{n} images are too few for {world} process(es): each needs at least 2 per batch")
        return global_batch, batch_local

    def timing_batch(self) -> torch.Tensor:
        """Indices of one full local batch, for timing steps (budget planning)."""
        return torch.arange(self.batch_sizes()[1])

    def _slowest(self, seconds: tuple[float, ...]) -> tuple[float, ...]:
        """Every rank plans with the slowest rank's times, so that all agree on the epochs."""
        times = all_reduce_max(torch.tensor(seconds, dtype=torch.float64, device=self.runtime.device), self.dist)
        return tuple(float(t) for t in times)

    def _record_budget(self, plan: BudgetPlan, message: str) -> None:
        """`plan`'s epochs into the config, config.json and budget.json; `message` says what was planned."""
        self.budget_plan = plan
        self.config = self.config.model_copy(update={"epochs": plan.epochs})
        self.echo(message)
        if self.dist.is_main:
            atomic_write_json(self.run_dir / "config.json", self.config.model_dump(mode="json"))
            atomic_write_json(self.run_dir / "budget.json", plan.as_dict())

    def plan_time_budget(self, budget_s: float) -> BudgetPlan:
        """Time real steps, then fix every stage's epochs so the whole run fits `budget_s` (training/budget.py);
        the plan is written into config.json and budget.json."""
        started = time.perf_counter()
        full_step_s, last_layer_step_s = measure_step_seconds(self)
        # the calibration's own time is agreed too: each rank's differs a little, and a plan that differs
        # by one epoch between ranks leaves one waiting forever in a collective the other never joins
        *agreed_step_s, calibration = self._slowest((full_step_s, last_layer_step_s, time.perf_counter() - started))
        step_s = (agreed_step_s[0], agreed_step_s[1])
        _, batch_local = self.batch_sizes()
        steps = _steps_per_epoch(len(self.dataset) // self.dist.world_size, batch_local)
        epochs = epochs_for_budget(budget_s - calibration, step_s, steps)
        plan = BudgetPlan(budget_s, step_s, steps, epochs, round(calibration, 2))
        self._record_budget(plan, plan.describe())
        return plan

    def _replan_budget(self, run: _Stage, done: _EpochDone) -> None:
        """After stage 1's first epoch: the budget planned again from its steady step time (training/budget.py),
        the stage's schedule stretched to the new epochs, config.json and budget.json rewritten, and a
        checkpoint saved so that a resumed run keeps the new plan."""
        assert self.budget_plan is not None
        (step_s,) = self._slowest((done.steady_step_s,))
        plan = replan(self.budget_plan, step_s)
        self._record_budget(plan, plan.describe_replan())
        run.epochs = plan.epochs[0]
        run.warmup_steps = effective_warmup_epochs(self.config.warmup_epochs[0], run.epochs) * run.steps_per_epoch
        self._save(run.optimizer)

    def _replan_before_stage(self, stage: int) -> None:
        """Before stage 2 or 3 of a budgeted run: the stages to come share what is left of the budget, at the
        last epoch's speed (training/budget.py); the new plan goes to config.json, budget.json and last.pt."""
        assert self.budget_plan is not None and self._last_step_s is not None
        elapsed = self.elapsed_before + time.perf_counter() - self._started
        elapsed, step_s = self._slowest((elapsed, self._last_step_s[1]))
        plan = replan_remaining(self.budget_plan, stage, elapsed, step_s)
        self._record_budget(plan, plan.describe_stage_replan())
        self._save(None)

    def run(self) -> TrainSummary:
        self._started = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.position.stage > 1 or self.position.epoch or self.position.step:
            self._trim_log()
            self.echo(
                f"resuming at stage {self.position.stage}, epoch {self.position.epoch + 1}, step {self.position.step}"
            )
        global_batch, batch_local = self.batch_sizes()
        last_loss: float | None = None
        with _SignalGuard() as guard:
            for stage in (1, 2, 3):
                if stage < self.position.stage:
                    continue
                if self.budget_plan is not None and self._last_step_s is not None and self._last_step_s[0] == stage - 1:
                    self._replan_before_stage(stage)  # (only in the process that ran the stage before)
                epochs = self.config.epochs[stage - 1]  # (as the budget's re-plans left it)
                self._prepare_stage(stage)
                if epochs == 0:
                    self.echo(f"stage {stage} ({STAGE_NAMES[stage]}): 0 epochs, skipped")
                else:
                    completed, last_loss = self._run_stage(stage, epochs, global_batch, batch_local, guard)
                    if not completed:
                        break
                self.finished_stage = stage
                self.position = Position(stage + 1, 0, 0)
                self._save(None, f"stage{stage}.pt")
                self._optimizer_state = None
                barrier(self.dist)
                if guard.requested:
                    self.echo(f"stopped after stage {stage}; checkpoint saved: {self.run_dir}")
                    break
        seconds = self.elapsed_before + time.perf_counter() - self._started
        stopped = guard.requested and self.position.stage <= 3
        return TrainSummary(self.run_dir, seconds, last_loss, self.position, stopped_early=stopped)

    def _start_stage(self, stage: int, epochs: int, global_batch: int, batch_local: int) -> _Stage:
        """The optimiser (restored mid-stage) and the step schedule of a stage; announces it."""
        config, device = self.config, self.runtime.device
        model = self.wrap_model(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        base_lr = config.lr_for_stage(stage, global_batch)
        optimizer = torch.optim.SGD(
            trainable,
            lr=base_lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            fused=True if device.type == "cuda" else None,  # one kernel for all parameters on a GPU
        )
        if self._optimizer_state is not None and (self.position.epoch or self.position.step):
            optimizer.load_state_dict(self._optimizer_state)
        steps_per_epoch = _steps_per_epoch(len(self.dataset) // self.dist.world_size, batch_local)
        self.echo(
            f"stage {stage}/3 ({STAGE_NAMES[stage]}): {epochs} epochs x {steps_per_epoch} steps, batch {global_batch}, "
            f"lr {base_lr:.3g}, {sum(p.numel() for p in trainable):,} trainable parameters"
        )
        return _Stage(
            stage=stage,
            epochs=epochs,
            batch_local=batch_local,
            model=model,
            optimizer=optimizer,
            trainable=trainable,
            base_lr=base_lr,
            steps_per_epoch=steps_per_epoch,
            warmup_steps=effective_warmup_epochs(config.warmup_epochs[stage - 1], epochs) * steps_per_epoch,
            flops_per_image=training_flops_per_image(self.forward_flops, stage),
        )

    def _run_stage(
        self, stage: int, epochs: int, global_batch: int, batch_local: int, guard: _SignalGuard
    ) -> tuple[bool, float | None]:
        """Train one stage from the current position; (False, None) when stopped by a signal."""
        run = self._start_stage(stage, epochs, global_batch, batch_local)
        epoch_times: list[float] = []
        epoch_loss: float | None = None
        epoch = self.position.epoch
        while epoch < run.epochs:  # (run.epochs may change: the budget's re-plan after stage 1's first epoch)
            done = self._run_epoch(run, epoch, guard)
            if done is None:  # stopped mid-epoch; the checkpoint is saved
                return False, None
            epoch_loss = self._finish_epoch(run, epoch, done, epoch_times)
            self._last_step_s = (stage, done.steady_step_s)
            replanning = stage == 1 and epoch == 0 and self.budget_plan is not None and not self.budget_plan.replanned
            if replanning:
                self._replan_budget(run, done)
            if done.stop and epoch + 1 < run.epochs:
                self._save(run.optimizer)
                self.echo(f"checkpoint saved after stage {stage}, epoch {epoch + 1}: {self.run_dir}")
                return False, None
            if (epoch + 1) % self.config.checkpoint_every == 0 and epoch + 1 < run.epochs and not replanning:
                self._save(run.optimizer)
            epoch += 1
        return True, epoch_loss

    def _run_epoch(self, run: _Stage, epoch: int, guard: _SignalGuard) -> _EpochDone | None:
        """The steps of one epoch from the current position; None when a signal stopped it mid-epoch
        (after saving the position, the optimiser and the epoch's loss so far)."""
        stage, device = run.stage, self.runtime.device
        batches = self._epoch_batches(stage, epoch, run.batch_local)
        first_step = self.position.step if epoch == self.position.epoch else 0
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        if first_step and self._partial_loss is not None:  # mid-epoch resume: keep the epoch's mean exact
            loss_sum += self._partial_loss
        self._partial_loss = None
        images_seen = 0
        bar = tqdm(
            total=len(batches),
            initial=first_step,
            desc=f"stage {stage} epoch {epoch + 1}/{run.epochs}",
            leave=False,
            disable=not self.show_progress if self.show_progress is not None else None,
            dynamic_ncols=True,
        )
        lr, stop = run.base_lr, False
        steady_from: tuple[float, int] | None = None  # (time, step) once WARM_STEPS steps are done
        total_steps = run.epochs * run.steps_per_epoch
        # read ahead when streamed from a store; closing stops the read-ahead thread however the epoch ends
        with contextlib.closing(self.source.iterate(batches[first_step:])) as images:
            for step, batch in zip(range(first_step, len(batches)), images, strict=True):
                lr = learning_rate(epoch * run.steps_per_epoch + step, total_steps, run.warmup_steps, run.base_lr)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                loss = self.train_step(
                    run.model, run.optimizer, run.trainable, batches[step], stage, epoch, step, batch=batch
                )
                loss_sum += loss.detach()
                images_seen += len(batches[step]) * self.dist.world_size
                if not bar.disable and (bar.n % 5 == 0 or step == len(batches) - 1):  # .item() waits for a GPU
                    rate = images_seen / max(1e-9, time.perf_counter() - started)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if step + 1 - first_step == WARM_STEPS:
                    steady_from = (time.perf_counter(), step + 1)
                stop = self._stop_requested(guard, last_step=step == len(batches) - 1)
                if stop and step + 1 < len(batches):
                    bar.close()
                    self.position = Position(stage, epoch, step + 1)
                    self._partial_loss = float(loss_sum)
                    self._save(run.optimizer)
                    self.echo(f"checkpoint saved at stage {stage}, epoch {epoch + 1}, step {step + 1}: {self.run_dir}")
                    return None
        bar.close()
        ended = time.perf_counter()
        if steady_from is not None and steady_from[1] < len(batches):
            steady_step_s = (ended - steady_from[0]) / (len(batches) - steady_from[1])
        else:  # too few steps to leave the first ones out
            steady_step_s = (ended - started) / max(1, len(batches) - first_step)
        return _EpochDone(loss_sum / len(batches), images_seen, lr, ended - started, stop, steady_step_s)

    def _finish_epoch(self, run: _Stage, epoch: int, done: _EpochDone, epoch_times: list[float]) -> float:
        """The epoch's mean loss (refused when not finite), its log line and message; the new position."""
        stage, epochs = run.stage, run.epochs
        epoch_loss = float(all_reduce_mean(done.mean_loss, self.dist))
        if not math.isfinite(epoch_loss):
            raise UserError(
                f"training diverged at stage {stage}, epoch {epoch + 1} (loss {epoch_loss}); "
                f"lower the learning rate (--lr) or resume from {self.run_dir / 'last.pt'}"
            )
        epoch_times.append(done.seconds)
        rate = done.images_seen / max(done.seconds, 1e-9)
        eta = sum(epoch_times[-5:]) / len(epoch_times[-5:]) * (epochs - epoch - 1)
        self._log_epoch(
            {
                "stage": stage,
                "epoch": epoch + 1,
                "loss": round(epoch_loss, 6),
                "lr": done.lr,
                "images_per_s": round(rate, 1),
                "model_tflop_s": round(rate * run.flops_per_image / 1e12, 4),
                "seconds": round(done.seconds, 3),
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        self.echo(
            f"stage {stage} epoch {epoch + 1:>4}/{epochs}  loss {epoch_loss:.4f}  lr {done.lr:.3g}  "
            f"{rate:,.0f} img/s  {done.seconds:.1f}s  stage ETA {format_seconds(eta)}"
        )
        self.position = Position(stage, epoch + 1, 0)
        return epoch_loss

    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainable: list[torch.nn.Parameter],
        indices: torch.Tensor,
        stage: int,
        epoch: int,
        step: int,
        batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One optimiser step on the images `indices` (`batch`: those images already on the device,
        uint8 NCHW, as the epoch's read-ahead delivers them)."""
        device = self.runtime.device
        generator = seeded_generator(device, self.config.seed, "augment", stage, epoch, step, self.dist.rank)
        with record_function("augment"):  # named parts for benchmarks/gpu/profile_step.py; free otherwise
            if batch is None:
                batch = self.source.gather(indices)
            views = torch.cat([self.augment(batch, generator), self.augment(batch, generator)])
            if self.runtime.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
        with record_function("forward"), self.runtime.autocast():
            z, _ = model(views)
        with record_function("loss"):
            loss = self.loss_fn(z.float())
        with record_function("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            if self.config.grad_clip is not None:
                nn.utils.clip_grad_value_(trainable, self.config.grad_clip)
            optimizer.step()
        return loss


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


TIMED_STEPS = 3


def time_steps(step: Callable[[], object], steps: int = TIMED_STEPS) -> float:
    """Median seconds of `steps` calls after one untimed warm-up call."""
    step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def measure_step_seconds(trainer: StagedTrainer) -> tuple[float, float]:
    """Seconds per full training step and per stage-2 step, on copies of the trainer's network.

    Uses the trainer's own step function, batch size, augmentation and precision, so the figure is what
    the run will see; the copies and their optimisers are thrown away afterwards.
    """
    results = []
    batch = trainer.timing_batch()
    for frozen_trunk in (False, True):
        model = copy.deepcopy(trainer.model)
        if frozen_trunk:  # a throwaway generator: the global RNG (saved in checkpoints) stays untouched
            model.to_map_output(trainer.config.out_dim, generator=torch.Generator().manual_seed(0))
            model.head[-1].to(trainer.runtime.device)
        model.set_trainable(last_layer_only=frozen_trunk)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=1e-6, momentum=0.9)
        step = functools.partial(trainer.train_step, trainer.wrap_model(model), optimizer, trainable, batch, 0, 0, 0)
        results.append(time_steps(step))
    return results[0], results[1]
