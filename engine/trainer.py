"""The training loop: epochs x iterations, validation each epoch, checkpoints, the ensemble.

Everything a resumed run needs is in its newest checkpoint (parameters, Adam moments, BN running
sets, the iteration counter and the validation history); tasks are a pure function of their
global index and the schedules a pure function of the epoch, so resuming at iteration k replays
exactly what an uninterrupted run would have done from k on.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import checkpoints as ckpt
from engine.config import Config, from_dict
from engine.control import ControlReader
from engine.data.progress import Reporter
from engine.data.splits import check_run_split, split_record
from engine.distributed import (
    SINGLE,
    World,
    all_gather_rows,
    barrier,
    broadcast_object,
    broadcast_tensors,
    check_divisible,
)
from engine.errors import UserError
from engine.evaluation import (
    ensemble,
    ensemble_sentences,
    evaluate_tasks,
    summarize,
    task_batches,
)
from engine.events import EventWriter
from engine.learner import MetaLearner, NonFiniteLossError, StepMetrics
from engine.preprocess import Preprocessing
from engine.run_store import RunDir
from engine.schedule import second_order_at
from engine.selection import top_k_epochs
from engine.system_stats import SystemStats

SYSTEM_EVERY_S = 5.0
PAUSE_POLL_S = 0.2


def pick_device(requested: str, world: World = SINGLE) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and world.active:
        requested = f"cuda:{world.local_rank}"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; "
                        "use --device cpu.")
    return torch.device(requested)


def run_config(run: RunDir) -> Config:
    raw = dict(run.read_config())
    raw.pop("runtime", None)
    raw.pop("study", None)  # a study member's tag (engine/studies.py), not part of the config
    return from_dict(raw)


@dataclass
class Progress:
    """What a foreground progress display gets after every iteration."""

    iteration: int
    total: int
    epoch: int
    metrics: StepMetrics | None
    iters_per_sec: float
    val_accuracy: float | None = None


@dataclass
class _State:
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per validated epoch


class Trainer:
    """One run's engine. Under torchrun every rank builds one; rank 0 alone reads and writes
    the run directory, the others get the config and checkpoints from it by broadcast."""

    def __init__(self, run: RunDir, device: str = "auto",
                 on_progress: Callable[[Progress], None] | None = None,
                 world: World = SINGLE) -> None:
        self.run = run
        self.world = world
        self.main = world.is_main
        raw = run_config(run).to_dict() if self.main else None
        self.config = from_dict(broadcast_object(raw, world))
        check_divisible(self.config.train.meta_batch, world)
        self.device = pick_device(device, world)
        self.on_progress = on_progress if self.main else None
        self.log = _file_logger(run) if self.main else _null_logger()
        self.events = EventWriter(run.events_path) if self.main else None
        self.state = _State()
        t = self.config.train
        self.ipe = t.iters_per_epoch
        self.total = t.epochs * t.iters_per_epoch
        self.log_every = max(1, self.ipe // 50)

    # ---- entry point ----------------------------------------------------------------------

    def train(self) -> str:
        """Run to the end (or until stopped); return the final state. Never raises for engine
        failures: they are written to engine.log and status.json as state "failed"."""
        if self.main:
            self.run.acquire_lock()
            self.control = ControlReader(self.run.path)  # after the lock: older ones are stale
        try:
            return self._train()
        except KeyboardInterrupt:
            self._checkpoint("interrupted")
            self._set_state("stopped", "interrupted")
            return "stopped"
        except NonFiniteLossError as e:
            self.log.error("stopping: %s", e)
            self._set_state("failed", str(e), error=str(e))
            return "failed"
        except UserError as e:
            self.log.error("%s", e)
            self._set_state("failed", str(e), error=str(e))
            raise
        except Exception as e:
            self.log.error("engine crashed:\n%s", traceback.format_exc())
            message = f"{type(e).__name__}: {e}"
            self._set_state("failed", message, error=message)
            return "failed"
        finally:
            if hasattr(self, "prefetcher"):
                self.prefetcher.close()
            if self.main:
                self.events.close()
                self.run.release_lock()

    def _train(self) -> str:
        from engine.data import load_dataset, sampler_for

        cfg = self.config
        if not self.main:  # rank 0 builds a missing cache (quickstart) before the others read it
            barrier(self.world)
        dataset = load_dataset(cfg.data.dataset, reporter=_LogReporter(self.log))
        self.data_split = split_record(dataset.manifest)
        if self.main:
            barrier(self.world)
        self.samplers = {s: sampler_for(cfg, s, dataset) for s in ("train", "val", "test")}
        for split, sampler in self.samplers.items():  # folder datasets: classes too small
            if sampler.excluded:
                self.log.warning("%d %s classes of %s have fewer than %d images (shots + "
                                 "queries) and are left out of its tasks: %s",
                                 len(sampler.excluded), split, dataset.name,
                                 cfg.data.shots + cfg.data.queries, ", ".join(sampler.excluded))
        # how images become inputs, kept with the run so predict and export use the same
        self.input = Preprocessing.from_manifest(dataset.manifest).to_dict()
        self.learner = MetaLearner(cfg, self.device, world=self.world)
        self._resume()
        self._record_runtime()
        self._set_state("running", "resumed" if self.state.iteration else "started")
        if self.state.iteration == 0:
            self._lslr_event()
        stats = SystemStats(self.device)
        last_system = 0.0
        batches = self._prefetcher()
        tick, tick_iter = time.perf_counter(), self.state.iteration
        speed = 0.0
        while True:
            if self._epoch_needs_validation():
                self._end_epoch()
                tick, tick_iter = time.perf_counter(), self.state.iteration  # it/s: training only
            if self.state.iteration >= self.total:
                break
            outcome = self._handle_control()
            if outcome is not None:
                return outcome
            k = self.state.iteration
            epoch = k // self.ipe
            self._announce_phases(k, epoch)
            metrics = self.learner.train_step(next(batches), epoch)
            self.state.iteration = k + 1
            now = time.perf_counter()
            if now - tick > 1.0:
                speed = (self.state.iteration - tick_iter) / (now - tick)
                tick, tick_iter = now, self.state.iteration
            if k % self.log_every == 0 or self.state.iteration == self.total:
                self._event("train", loss=metrics.loss, accuracy=metrics.accuracy,
                            step_losses=metrics.step_losses, msl_weights=metrics.msl_weights,
                            meta_lr=metrics.meta_lr, second_order=metrics.second_order,
                            iters_per_sec=speed,
                            data_wait_s=round(self.prefetcher.wait_seconds, 4))
                if self.main:
                    self.run.write_status(iteration=self.state.iteration, epoch=epoch)
            if self.main and time.monotonic() - last_system > SYSTEM_EVERY_S:
                last_system = time.monotonic()
                self._event("system", **stats.snapshot())
            every = cfg.train.checkpoint_every
            if every and self.state.iteration % every == 0 and self.state.iteration % self.ipe:
                self._checkpoint("every")
            if self.on_progress:
                self.on_progress(Progress(self.state.iteration, self.total, epoch, metrics, speed,
                                          self._last_val()))
        if not broadcast_object(self.main and self.run.read_ensemble() is not None, self.world):
            self.run_ensemble()
        self._set_state("finished", "all epochs done")
        return "finished"

    # ---- pieces of the loop ---------------------------------------------------------------

    def _prefetcher(self):
        from engine.data import Prefetcher

        mb = self.config.train.meta_batch
        start = self.state.iteration
        first, count = self.world.share(start * mb, mb)
        self.prefetcher = Prefetcher(self.samplers["train"], first, count, self.total - start,
                                     self.device, stride=mb)
        return iter(self.prefetcher)

    def _epoch_needs_validation(self) -> bool:
        k = self.state.iteration
        done_epochs = k // self.ipe
        return k > 0 and k % self.ipe == 0 and len(self.state.history) < done_epochs

    def _end_epoch(self) -> None:
        epoch = self.state.iteration // self.ipe - 1
        summary = self.validate()
        entry = {"epoch": epoch, "accuracy": summary.accuracy, "ci95": summary.ci95,
                 "loss": summary.loss, "tasks": summary.tasks}
        self.state.history.append(entry)
        self._event("val", iteration=self.state.iteration, epoch=epoch, **{
            k: v for k, v in entry.items() if k != "epoch"})
        self.log.info("epoch %d: validation accuracy %.4f +- %.4f over %d tasks", epoch,
                      summary.accuracy, summary.ci95, summary.tasks)
        self._checkpoint("epoch", epoch=epoch, val_accuracy=summary.accuracy)
        self._lslr_event(epoch=epoch)
        if self.on_progress:
            self.on_progress(Progress(self.state.iteration, self.total, epoch, None, 0.0,
                                      summary.accuracy))

    def validate(self):
        logits, labels, losses = evaluate_split(self.learner, self.samplers["val"],
                                                self.config.eval.val_tasks, self.world)
        return summarize(logits, labels, losses)

    def run_ensemble(self, top_k: int | None = None, n_tasks: int | None = None) -> dict:
        result = run_ensemble(self.run, self.config, self.device, top_k, n_tasks,
                              self.samplers["test"], self.world)
        for line in ensemble_sentences(result):
            self.log.info("%s", line)
        return result

    def _handle_control(self) -> str | None:
        """Apply pending commands (rank 0); every rank learns whether the run ends here."""
        outcome = self._poll_control() if self.main else None
        return broadcast_object(outcome, self.world)

    def _poll_control(self) -> str | None:
        paused = False
        while True:
            for command in self.control.poll():
                if command == "checkpoint":
                    self._checkpoint("requested")
                elif command == "pause" and not paused:
                    paused = True
                    self._set_state("paused", "requested")
                elif command == "unpause" and paused:
                    paused = False
                    self._set_state("running", "unpaused")
                elif command == "stop":
                    self._checkpoint("stop")
                    self._set_state("stopped", "requested")
                    return "stopped"
            if not paused:
                return None
            time.sleep(PAUSE_POLL_S)

    def _announce_phases(self, k: int, epoch: int) -> None:
        if k % self.ipe:
            return
        cfg = self.config
        if second_order_at(epoch, cfg) and (epoch == 0 or not second_order_at(epoch - 1, cfg)):
            self.log.info("epoch %d: second-order meta-gradients from here on", epoch)
        p = cfg.maml_pp
        if p.msl and epoch == p.msl_epochs:
            self.log.info("epoch %d: multi-step loss off, final step only from here on", epoch)

    # ---- checkpoints and resume -----------------------------------------------------------

    def _checkpoint(self, reason: str, epoch: int | None = None,
                    val_accuracy: float | None = None) -> None:
        if not hasattr(self, "learner") or not self.main:
            return
        k = self.state.iteration
        name = ckpt.epoch_name(epoch) if epoch is not None else ckpt.iter_name(k)
        meta = {"iteration": k, "epoch": k // self.ipe if epoch is None else epoch,
                "val_accuracy": val_accuracy, "history": self.state.history,
                "config_digest": self.config.digest(), "reason": reason}
        path = ckpt.save_checkpoint(self.run.checkpoints_dir, name,
                                    self.learner.state_tensors(), meta)
        ckpt.prune(self.run.checkpoints_dir, self.config.eval.ensemble_top_k)
        self._event("checkpoint", path=str(path.relative_to(self.run.path)),
                    val_accuracy=val_accuracy, reason=reason)
        self.log.info("checkpoint %s saved (%s)", name, reason)

    def _resume(self) -> None:
        found = self._load_newest() if self.main else None
        found = broadcast_object(found and (found[0], found[2]), self.world)
        if not found:
            return
        name, meta = found
        tensors = broadcast_tensors(self._resume_tensors if self.main else {}, self.world)
        self.learner.load_state_tensors(tensors)
        self.state = _State(int(meta["iteration"]), list(meta.get("history", [])))
        self.log.info("resumed from checkpoint %s at iteration %d", name, self.state.iteration)

    def _load_newest(self):
        directory = self.run.checkpoints_dir
        if not ckpt.list_checkpoints(directory):
            return None
        name, tensors, meta, skipped = ckpt.load_latest_valid(directory)
        for bad, why in skipped:
            self.log.warning("checkpoint %s is unusable (%s); falling back", bad, why)
            print(f"warning: checkpoint {bad} is unusable ({why}); falling back to an older one",
                  flush=True)
        if meta.get("config_digest") != self.config.digest():
            raise UserError(f"Checkpoint {name} was made with a different config than "
                            f"{self.run.run_id}'s config.json; it cannot be resumed.")
        recorded = (self.run.read_config().get("runtime") or {}).get("data_split")
        check_run_split(self.run.run_id, self.config.data.dataset, recorded, self.data_split)
        self._resume_tensors = tensors
        return name, tensors, meta

    def _last_val(self) -> float | None:
        return self.state.history[-1]["accuracy"] if self.state.history else None

    # ---- files ----------------------------------------------------------------------------

    def _event(self, type: str, iteration: int | None = None, epoch: int | None = None,
               **fields: Any) -> None:
        if not self.main:
            return
        k = self.state.iteration if iteration is None else iteration
        e = max(0, (k - 1)) // self.ipe if epoch is None else epoch
        self.events.write(type, iteration=k, epoch=e, **fields)

    def _set_state(self, state: str, reason: str, error: str | None = None) -> None:
        if not self.main:
            return
        k = self.state.iteration
        self.run.write_status(state=state, pid=os.getpid(), iteration=k,
                              epoch=min(k // self.ipe, self.config.train.epochs - 1), error=error)
        self._event("state", state=state, reason=reason, world_size=self.world.size)

    def _lslr_event(self, epoch: int = 0) -> None:
        rates = {k: v.detach().cpu().tolist() for k, v in self.learner.meta.lrs.items()}
        self._event("lslr", epoch=epoch, rates=rates)

    def _record_runtime(self) -> None:
        from engine.run_store import atomic_write_json

        if not self.main:
            return
        raw = dict(self.run.read_config())
        raw["runtime"] = {"device": str(self.device), **self.learner.paths.to_dict(),
                          "dtype": "float32", "torch": torch.__version__,
                          "world_size": self.world.size, "data_split": self.data_split}
        raw["runtime"]["input"] = getattr(self, "input", None)
        atomic_write_json(self.run.config_path, raw)


def evaluate_split(learner: MetaLearner, sampler, n_tasks: int, world: World = SINGLE):
    """Adapt the fixed tasks 0..n_tasks-1, each rank its contiguous share, gathered in order."""
    first, count = world.share(0, n_tasks)
    logits, labels, losses = evaluate_tasks(
        learner, task_batches(lambda s, c: sampler.batch(first + s, c), count),
        learner.config.train.chunk_size)
    if world.active:
        counts = [World(r, world.size).share(0, n_tasks)[1] for r in range(world.size)]
        logits, labels, losses = (all_gather_rows(t.to(world.device), counts, world).cpu()
                                  for t in (logits, labels, losses))
    return logits, labels, losses


def run_ensemble(run: RunDir, config: Config, device: torch.device, top_k: int | None = None,
                 n_tasks: int | None = None, sampler=None, world: World = SINGLE) -> dict:
    """Adapt the top-k validation epochs on the same fixed test tasks and average their logits;
    writes ensemble.json and returns it."""
    for attempt in range(3):
        try:
            return _run_ensemble(run, config, device, top_k, n_tasks, sampler, world)
        except ckpt.CheckpointError:
            if attempt == 2:  # a training engine prunes checkpoints; choose again
                raise
    raise AssertionError("unreachable")


def _run_ensemble(run: RunDir, config: Config, device: torch.device, top_k: int | None,
                  n_tasks: int | None, sampler, world: World) -> dict:
    directory = run.checkpoints_dir
    top_k = top_k or config.eval.ensemble_top_k
    n_tasks = n_tasks or config.eval.test_tasks
    scored = []
    if world.is_main:
        for name in ckpt.list_checkpoints(directory):
            meta = ckpt.read_sidecar(directory, name)
            if meta.get("val_accuracy") is not None:
                scored.append((meta["val_accuracy"], meta["epoch"], name))
    scored = broadcast_object(scored, world)
    if not scored:
        raise UserError(f"Run {run.run_id} has no validated epoch checkpoints yet; train at least "
                        "one epoch before running the ensemble.")
    by_epoch = {epoch: (acc, epoch, name) for acc, epoch, name in scored}
    chosen = [by_epoch[e] for e in top_k_epochs(
        [{"epoch": epoch, "accuracy": acc} for acc, epoch, _ in scored], top_k)]
    if sampler is None:  # not the training engine: the cache may have changed since
        from engine.data import load_dataset, sampler_for

        dataset = load_dataset(config.data.dataset)
        if world.is_main:
            recorded = (run.read_config().get("runtime") or {}).get("data_split")
            check_run_split(run.run_id, config.data.dataset, recorded,
                            split_record(dataset.manifest), "run the ensemble")
        sampler = sampler_for(config, "test", dataset)
    learner = MetaLearner(config, device)
    member_logits, labels = [], None
    for _, _, name in chosen:
        tensors = ckpt.load_checkpoint(directory, name)[0] if world.is_main else {}
        learner.load_state_tensors(broadcast_tensors(tensors, world))
        logits, labels, _ = evaluate_split(learner, sampler, n_tasks, world)
        member_logits.append(logits)
    result = ensemble(member_logits, labels, [epoch for _, epoch, _ in chosen]).to_dict()
    result["member_val_accuracies"] = [acc for acc, _, _ in chosen]
    if not world.is_main:
        return result
    _save_logits(run, torch.stack(member_logits), labels)
    run.write_ensemble(result)
    status = run.read_raw_status()
    with EventWriter(run.events_path) as events:
        events.write("ensemble", iteration=status.get("iteration", 0),
                     epoch=status.get("epoch", 0), **result)
    return result


def _save_logits(run: RunDir, member_logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Keep the members' test logits ([members, tasks, queries, ways]) for later analysis."""
    from safetensors.torch import save

    from engine.run_store import atomic_write_bytes

    data = save({"member_logits": member_logits.contiguous(), "labels": labels.contiguous()})
    atomic_write_bytes(run.path / "ensemble-logits.safetensors", data)


class _LogReporter(Reporter):
    """Data notes (a cache being rebuilt) and finished data jobs, into the engine log."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.job = ""
        self.t0 = 0.0

    def start(self, description: str, total: int | None = None, unit: str = "items") -> None:
        self.job, self.t0 = description, time.monotonic()

    def done(self) -> None:
        if self.job:
            self.log.info("%s: done in %.1f s", self.job, time.monotonic() - self.t0)
        self.job = ""

    def note(self, message: str) -> None:
        self.log.info("%s", message)


def _null_logger() -> logging.Logger:
    log = logging.getLogger("mamlpp.engine.rank")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return log


def _file_logger(run: RunDir) -> logging.Logger:
    log = logging.getLogger(f"mamlpp.engine.{run.run_id}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.FileHandler(run.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    return log

