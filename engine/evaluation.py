"""Validation and the top-k ensemble (SPEC 4): fixed tasks, adapted in bulk, logits averaged."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from engine.learner import MetaLearner
from engine.tasks import TaskBatch

EVAL_BATCH = 50  # tasks assembled and adapted together


def ci95(accuracies: torch.Tensor) -> float:
    """1.96 * std over tasks / sqrt(n), std with ddof=0 as in the reference code."""
    n = accuracies.numel()
    return 1.96 * accuracies.double().std(unbiased=False).item() / math.sqrt(n) if n else 0.0


@dataclass
class EvalSummary:
    accuracy: float
    ci95: float
    loss: float
    tasks: int


def task_batches(batch_of: Callable[[int, int], TaskBatch], n_tasks: int,
                 size: int = EVAL_BATCH) -> Iterable[TaskBatch]:
    """The fixed tasks 0..n_tasks-1 of a split, `size` at a time."""
    for start in range(0, n_tasks, size):
        yield batch_of(start, min(size, n_tasks - start))


def evaluate_tasks(learner: MetaLearner, batches: Iterable[TaskBatch],
                   chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, Q, ways], labels [n, Q], losses [n]) on CPU for every task, in order."""
    logits, labels, losses = [], [], []
    for batch in batches:
        result = learner.evaluate(batch, chunk=chunk)
        logits.append(result.logits.float().cpu())
        labels.append(batch.y_query.cpu())
        losses.append(result.loss.float().cpu())
    return torch.cat(logits), torch.cat(labels), torch.cat(losses)


def accuracy_per_task(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).double().mean(-1)


def summarize(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> EvalSummary:
    acc = accuracy_per_task(logits, labels)
    return EvalSummary(acc.mean().item(), ci95(acc), losses.mean().item(), len(acc))


@dataclass
class EnsembleResult:
    members: list[int]  # epochs
    member_accuracies: list[float]
    member_ci95: list[float]
    accuracy: float
    ci95: float
    tasks: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def ensemble(member_logits: list[torch.Tensor], labels: torch.Tensor,
             members: list[int]) -> EnsembleResult:
    """Average the members' query logits per task, then argmax (SPEC 4)."""
    accs = [accuracy_per_task(lg, labels) for lg in member_logits]
    mean_logits = torch.stack(member_logits).mean(0)
    acc = accuracy_per_task(mean_logits, labels)
    return EnsembleResult(members, [a.mean().item() for a in accs], [ci95(a) for a in accs],
                          acc.mean().item(), ci95(acc), len(acc))


def ensemble_sentences(result: dict) -> list[str]:
    """An ensemble result (ensemble.json) as plain log lines: one per member, one for the
    ensemble. What engine.log and `mamlpp ensemble --plain` (the dashboard's log) show."""
    n = result["tasks"]
    vals = result.get("member_val_accuracies") or [None] * len(result["members"])
    cis = result.get("member_ci95") or [None] * len(result["members"])
    lines = []
    for epoch, val, acc, ci in zip(result["members"], vals, result["member_accuracies"], cis,
                                   strict=True):
        seen = "" if val is None else f" (validation {100 * val:.2f}%)"
        spread = "" if ci is None else f" +- {100 * ci:.2f}"
        lines.append(f"ensemble member epoch {epoch}{seen}: test accuracy {100 * acc:.2f}%"
                     f"{spread} on {n} tasks")
    members = ", ".join(str(e) for e in result["members"])
    lines.append(f"ensemble of epochs {members}: test accuracy {100 * result['accuracy']:.2f}% "
                 f"+- {100 * result['ci95']:.2f} on {n} tasks")
    return lines
