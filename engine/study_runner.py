"""Running a study: its members one after another, or `jobs` at once, each in its own process.

Crash safety comes from the pieces below, not from anything this process remembers:

- Members run as `python -m engine.study_member RUN_DIR` processes (their own sessions), so the
  run's files, lock and checkpoints are exactly those of any run. When this process dies, even
  by SIGKILL, each member notices and checkpoints and stops at its next iteration
  (engine/study_member.py); nothing is lost and `study resume` continues it exactly.
- This process holds study.lock (one runner per study), and member runs are only made under
  members.lock after a scan for the member's tag (engine/studies.py), so a member never gets a
  second run. A member's run whose engine lock is held by another process (a member still
  stopping, or one started by hand from `--dry-run`) is waited for, never started twice.
- What to do with each member is decided from its run directory each time: finished ->
  skipped; stopped, failed or killed -> resumed from its newest valid checkpoint; none ->
  created and started.

A member that fails or is stopped by hand during this session is not retried in it (a NaN
loss would fail again); the next `study resume` tries it again.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine import control
from engine.errors import UserError
from engine.run_store import RunDir
from engine.studies import (
    Member,
    MemberRun,
    Study,
    hold_study_lock,
    member_run_for,
    member_runs,
    release_study_lock,
)

POLL_S = 0.5
RATE_WINDOW_S = 120.0
STOP_WAIT_S = 300.0


# ---------------------------------------------------------------- progress and ETAs


class RateTracker:
    """Iterations per wall-clock second of each run, from (time, iteration) samples over the
    last RATE_WINDOW_S: validation and checkpoints included, so ETAs come out honest."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self.samples: dict[str, collections.deque[tuple[float, int]]] = {}

    def add(self, run_id: str, iteration: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        q = self.samples.setdefault(run_id, collections.deque())
        if q and iteration < q[-1][1]:  # resumed from an earlier checkpoint
            q.clear()
        if not q or iteration != q[-1][1]:
            q.append((now, iteration))
        while len(q) > 2 and now - q[0][0] > self.window:
            q.popleft()

    def rate(self, run_id: str, now: float | None = None) -> float | None:
        q = self.samples.get(run_id)
        if not q or len(q) < 2:
            return None
        now = time.monotonic() if now is None else now
        (t0, i0), (_, i1) = q[0], q[-1]
        span = now - t0  # until now: a member stuck in validation slows down
        return (i1 - i0) / span if span > 1.0 and i1 > i0 else None


@dataclass
class MemberProgress:
    variant: str
    seed: int
    run_id: str | None
    state: str  # queued, running, waiting, finished, failed, stopped, ...
    iteration: int
    total: int
    rate: float | None = None  # iterations per wall second
    eta_s: float | None = None
    note: str = ""


@dataclass
class StudySnapshot:
    study_id: str
    members: list[MemberProgress]
    jobs: int
    elapsed_s: float
    eta_s: float | None
    stopping: bool = False

    def count(self, *states: str) -> int:
        return sum(1 for m in self.members if m.state in states)


def study_eta(members: list[MemberProgress], parallel: int,
              rate: float | None = None) -> float | None:
    """Seconds left: the iterations left over a member's rate times the members that can run
    at once. `rate` is the whole-member rate measured on members finished in this session
    (start-up, validation and the ensemble included); else the mean rate of running members
    (None until one is known)."""
    rates = [m.rate for m in members if m.rate]
    left = [m for m in members if m.state not in ("finished", "failed", "stopped", "deleted")]
    if not left:
        return 0.0
    if rate is None and not rates:
        return None
    rate = rate or sum(rates) / len(rates)
    remaining = sum(max(0, m.total - m.iteration) for m in left)
    return remaining / (rate * max(1, min(parallel, len(left))))


# ---------------------------------------------------------------- devices


def gpu_slots(device: str, jobs: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES value of each job slot (None: leave the environment alone):
    one GPU per job, round robin over the visible GPUs."""
    if device == "cpu":
        return [None] * jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
    else:
        ids = [str(i) for i in range(_gpu_count())]
    if device.startswith("cuda:"):
        n = int(device.split(":")[1])
        ids = [ids[n]] if n < len(ids) else [str(n)]
    if not ids:
        return [None] * jobs
    return [ids[i % len(ids)] for i in range(jobs)]


def _gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


# ---------------------------------------------------------------- the runner


@dataclass
class _Job:
    member: Member
    run: RunDir
    proc: subprocess.Popen[bytes]
    slot: int
    started: float
    first_iteration: int


@dataclass
class StudyOutcome:
    finished: list[str] = field(default_factory=list)  # member labels
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, why)
    stopped: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped and not self.interrupted


class StudyRunner:
    """Runs the unfinished members of a study to the end: `StudyRunner(study).run()`."""

    def __init__(self, study: Study, device: str = "auto", jobs: int = 1,
                 rerun_deleted: bool = False, poll_s: float = POLL_S,
                 on_snapshot: Callable[[StudySnapshot], None] | None = None,
                 on_message: Callable[[str], None] | None = None) -> None:
        if jobs < 1:
            raise UserError(f"--jobs must be at least 1 (got {jobs}).")
        self.study = study
        self.device = device
        self.jobs = jobs
        self.rerun_deleted = rerun_deleted
        self.poll_s = poll_s
        self.on_snapshot = on_snapshot or (lambda s: None)
        self.on_message = on_message or (lambda m: None)
        self.slots = gpu_slots(device, jobs)
        self.rates = RateTracker()
        self.outcome = StudyOutcome()
        self.started = time.monotonic()
        self.stopping = False
        self.done_iterations = 0  # of members finished in this session, and their wall time
        self.done_seconds = 0.0

    # -- entry point

    def run(self) -> StudyOutcome:
        hold_study_lock(self.study)
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._run()
        except KeyboardInterrupt:
            self.outcome.interrupted = True
            self._stop_all()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            release_study_lock(self.study)
        return self.outcome

    # -- the loop

    def _run(self) -> None:
        members = member_runs(self.study, strict=True, link=True,
                              rerun_deleted=self.rerun_deleted)
        self._prepare_data(members)
        self.progress: dict[tuple[str, int], MemberProgress] = {}
        queue: collections.deque[Member] = collections.deque()
        for mr in members:
            self.progress[_key(mr.member)] = MemberProgress(
                mr.member.variant, mr.member.seed, mr.run.run_id if mr.run else None,
                "finished" if mr.finished else "queued", mr.status.get("iteration") or 0,
                _total(mr.member))
            if mr.finished:
                self.outcome.finished.append(mr.member.label)
            else:
                queue.append(mr.member)
        self.jobs_running: dict[int, _Job] = {}
        waiting: dict[tuple[str, int], tuple[Member, RunDir]] = {}
        while queue or self.jobs_running or waiting:
            for key, (member, run) in list(waiting.items()):
                if not run.is_locked():  # whoever ran it let go: decide again
                    del waiting[key]
                    queue.appendleft(member)
            free = [s for s in range(self.jobs) if s not in self.jobs_running]
            while free and queue:
                member = queue.popleft()
                started, run = self._start(member, free[0])
                if started == "waiting":
                    waiting[_key(member)] = (member, run)
                elif started == "started":
                    free.pop(0)
            for slot, job in list(self.jobs_running.items()):
                if job.proc.poll() is not None:
                    del self.jobs_running[slot]
                    if self._ended(job) == "waiting":
                        waiting[_key(job.member)] = (job.member, job.run)
            self._refresh(waiting)
            if queue or self.jobs_running or waiting:
                time.sleep(self.poll_s)
        self._refresh({})

    def _prepare_data(self, members: list[MemberRun]) -> None:
        """Refuse missing data before anything starts; make the quickstart set once here rather
        than in every member process at once."""
        from engine.data import load_dataset, require_dataset

        names = {mr.member.config["data"]["dataset"] for mr in members if not mr.finished}
        for name in sorted(names):
            require_dataset(name)
            if name == "quickstart":
                load_dataset(name)

    def _start(self, member: Member, slot: int) -> tuple[str, RunDir | None]:
        """Start (or resume) the member's run in `slot`: ("started" | "finished" (nothing to
        do) | "waiting" (another process holds its run) | "failed" (its run cannot be used),
        the run)."""
        progress = self.progress[_key(member)]
        try:
            run = member_run_for(self.study, member)
        except UserError as e:  # deleted or edited by hand while the study ran
            progress.state = "failed"
            self.outcome.failed.append((member.label, str(e)))
            self.on_message(f"{member.label}: {e}")
            return "failed", None
        progress.run_id = run.run_id
        status = run.reconcile_status()
        if status.get("state") == "finished":
            progress.state = "finished"
            self.outcome.finished.append(member.label)
            return "finished", run
        if run.is_locked():
            progress.state = "waiting"
            progress.note = f"run by pid {run.lock_holder_pid()}"
            self.on_message(f"{member.label}: run {run.run_id} is running in another process "
                            f"(pid {run.lock_holder_pid()}); waiting for it")
            return "waiting", run
        how = "resuming" if status.get("iteration") else "starting"
        env = dict(os.environ)
        gpu = self.slots[slot]
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif self.jobs > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        device = "cuda" if gpu is not None and self.device.startswith("cuda") else self.device
        with open(run.log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.study_member", str(run.path), "--device", device,
                 "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=env)
        self.jobs_running[slot] = _Job(member, run, proc, slot, time.monotonic(),
                                       status.get("iteration") or 0)
        progress.state = "running"
        progress.note = ""
        where = f" on GPU {gpu}" if gpu is not None else ""
        self.on_message(f"{member.label}: {how} run {run.run_id}{where}")
        return "started", run

    def _ended(self, job: _Job) -> str:
        """Record how a member process ended; "waiting" when another process has its run."""
        progress = self.progress[_key(job.member)]
        if job.run.is_locked():  # it lost the race for the run's lock to another process
            progress.state = "waiting"
            return "waiting"
        status = job.run.reconcile_status()
        state = status.get("state")
        progress.iteration = status.get("iteration") or progress.iteration
        label = job.member.label
        if state == "finished":
            progress.state = "finished"
            self.outcome.finished.append(label)
            self.done_iterations += progress.total - job.first_iteration
            self.done_seconds += time.monotonic() - job.started
            acc = (job.run.read_ensemble() or {}).get("accuracy")
            result = f", test accuracy {100 * acc:.2f}%" if isinstance(acc, float) else ""
            self.on_message(f"{label}: finished run {job.run.run_id}{result}")
        elif state == "stopped" and not self.stopping:
            progress.state = "stopped"
            self.outcome.stopped.append(label)
            self.on_message(f"{label}: run {job.run.run_id} was stopped by hand; `mamlpp study "
                            f"resume {self.study.id}` continues it")
        elif state == "stopped":
            progress.state = "stopped"
        else:
            why = status.get("error") or f"engine exit code {job.proc.returncode}"
            progress.state = "failed"
            self.outcome.failed.append((label, why))
            self.on_message(f"{label}: run {job.run.run_id} failed: {why} (see "
                            f"{job.run.log_path})")
        return progress.state

    def _refresh(self, waiting: dict[tuple[str, int], tuple[Member, RunDir]]) -> None:
        now = time.monotonic()
        live = [(job.member, job.run) for job in self.jobs_running.values()]
        for member, run in [*live, *waiting.values()]:
            progress = self.progress[_key(member)]
            iteration = run.read_raw_status().get("iteration") or 0
            progress.iteration = iteration
            self.rates.add(run.run_id, iteration, now)
            progress.rate = self.rates.rate(run.run_id, now)
            progress.eta_s = ((progress.total - iteration) / progress.rate
                              if progress.rate else None)
        members = list(self.progress.values())
        parallel = max(1, len(self.jobs_running)) if self.stopping else self.jobs
        rate = self.done_iterations / self.done_seconds if self.done_iterations else None
        self.on_snapshot(StudySnapshot(self.study.id, members, self.jobs, now - self.started,
                                       study_eta(members, parallel, rate), self.stopping))

    def _stop_all(self) -> None:
        """Ctrl-C or SIGTERM: every running member checkpoints and stops at its next iteration
        (a second interrupt leaves them to do it alone, as they would if we were killed)."""
        self.stopping = True
        jobs = list(getattr(self, "jobs_running", {}).values())
        for job in jobs:
            with contextlib.suppress(Exception):
                control.send(job.run, "stop")
        if jobs:
            self.on_message(f"stopping {len(jobs)} running member(s) at their next iteration; "
                            f"`mamlpp study resume {self.study.id}` continues the study")
        deadline = time.monotonic() + STOP_WAIT_S
        try:
            while time.monotonic() < deadline:
                for slot, job in list(self.jobs_running.items()):
                    if job.proc.poll() is not None:
                        del self.jobs_running[slot]
                        self._ended(job)
                if not self.jobs_running:
                    break
                self._refresh({})
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            pass


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _key(member: Member) -> tuple[str, int]:
    return member.variant, member.seed


def _total(member: Member) -> int:
    t = member.config["train"]
    return t["epochs"] * t["iters_per_epoch"]
