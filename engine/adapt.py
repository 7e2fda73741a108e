"""Your own few-shot task on a trained model: load a run or an export, adapt on a support set,
predict queries. What `mamlpp predict` and the Python API (`mamlpp.load`) run.

    model = load("RUN-or-export-folder", members="ensemble")
    adapted = model.adapt(support_images, support_labels)
    probs = adapted.predict_proba(query_images)      # [queries, classes], classes = adapted.classes

Predictions are evaluation's computation, not a copy of it: the support and query images become
a task (`TaskBatch`, support class-major as the sampler lays tasks out) and go through
`MetaLearner.evaluate`, so adaptation uses the learned per-step rates, per-step batch norm and
the configured `bn_eval_stats`, first order, for `eval_inner_steps` steps (or `steps`). With
several members their query logits are averaged (`torch.stack(...).mean(0)`, as
`engine.evaluation.ensemble`), then softmax gives the probabilities.

- Classes: the sorted distinct support labels; label i is the network's output i. A support
  with fewer classes than the run's ways uses the first outputs only (the others still take
  part in the adaptation's cross-entropy, as a task's unused labels would); more classes than
  ways is refused.
- The queries are one query set, predicted in one pass as evaluation predicts a task's query
  set: with bn_eval_stats = "batch" (the paper's setting) batch norm normalises them with the
  query set's own statistics, so a prediction depends on the other queries, and a set that
  mixes the classes, as evaluation's tasks do, is what the model was trained for (one image, or
  images of one class only, get worse predictions). A set larger than `max_query_group` images
  (about 256 MiB of first-layer activations, never fewer than the run's ways x queries) is
  dealt round-robin into equal groups (query i to group i mod G), so each group is a sample of
  the whole set whatever its order; the groups run as tasks of one `evaluate` call.
- On CPU each task runs with the intra-op thread count evaluation's batches used
  (threads // task_threads), so the same task gives bit-identical logits in `mamlpp ensemble`
  and here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import Config
from engine.errors import UserError
from engine.preprocess import ImageReadError, Preprocessing
from engine.selection import top_k_epochs
from engine.tasks import TaskBatch

MEMBER_CHOICES = ("ensemble", "best")
# What built-in datasets' images go through when neither the run nor the cache says.
BUILTIN_INPUT = {
    "omniglot": Preprocessing("omniglot", 28, 1, 1, None),
    "quickstart": Preprocessing("omniglot", 28, 1, 1, None),
    "miniimagenet": Preprocessing("stretch", 84, 3, 255, ((0.485, 0.456, 0.406),
                                                          (0.229, 0.224, 0.225))),
}


@dataclass
class Member:
    """One network of the model: its tensors (net, bn, lslr, stats) and where it came from."""

    name: str
    epoch: int | None
    val_accuracy: float | None
    tensors: dict[str, torch.Tensor]
    test_accuracy: float | None = None


@dataclass
class ModelSource:
    """A loaded run or export: everything a prediction needs, nothing read from elsewhere."""

    kind: str  # "run" | "export"
    path: Path
    label: str  # run id or export folder
    config: Config
    preprocessing: Preprocessing
    members: list[Member]
    choice: str  # "ensemble" | "best" | "latest"
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---- finding and reading a model --------------------------------------------------------------

def resolve_source(ref: str | Path, members: str | None = None) -> ModelSource:
    """A run (id, unique prefix or run folder) or an export folder, loaded and verified."""
    from engine.model_export import MANIFEST, read_export

    if members is not None and members not in MEMBER_CHOICES:
        raise UserError(f"--members must be ensemble or best (got {members!r}).")
    path = Path(str(ref)).expanduser()
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return read_export(path, members)
        if (path / "config.json").is_file() and any(
                (path / f).exists() for f in ("status.json", "events.jsonl", "checkpoints")):
            from engine.run_store import RunDir

            return read_run(RunDir(path.resolve()), members)
        raise UserError(f"{path} is neither a mamlpp export (it has no {MANIFEST}) nor a run "
                        "folder; give a run id, a run folder or a folder made by `mamlpp export`.")
    from engine.run_store import find_run

    try:
        run = find_run(str(ref))
    except UserError as e:
        if path.exists() or "/" in str(ref):
            raise UserError(f"{ref} is not a folder; give a run id, a run folder or a folder "
                            "made by `mamlpp export`.") from None
        raise e
    return read_run(run, members)


def run_preprocessing(config: Config, recorded: Any, where: str) -> Preprocessing:
    """The run's input: as recorded when it trained (config.json runtime.input), else the
    dataset's cache manifest, else the built-in definition."""
    from engine.data.cache import read_manifest

    if recorded:
        return Preprocessing.from_dict(recorded, where)
    name = config.data.dataset
    manifest = read_manifest(name)
    if manifest is not None:
        return Preprocessing.from_manifest(manifest)
    if name in BUILTIN_INPUT:
        return BUILTIN_INPUT[name]
    raise UserError(f"{where} does not record its input preprocessing and the {name} dataset is "
                    f"not in the data cache; import it again with `mamlpp data import folder "
                    f"PATH --name {name}` (the same --size and --channels).")


def ensemble_candidates(directory: Path) -> list[tuple[float, int, str]]:
    """(val_accuracy, epoch, checkpoint) of every validated checkpoint, best first, ties to
    the earlier epoch: the order `mamlpp ensemble` takes its top-k members in."""
    from engine import checkpoints as ckpt

    scored = []
    for name in ckpt.list_checkpoints(directory):
        try:
            meta = ckpt.read_sidecar(directory, name)
        except ckpt.CheckpointError:
            continue
        if meta.get("val_accuracy") is not None:
            scored.append((meta["val_accuracy"], meta["epoch"], name))
    by_epoch = {epoch: (acc, epoch, name) for acc, epoch, name in scored}
    ranked = top_k_epochs([{"epoch": e, "accuracy": acc} for acc, e, _ in scored], len(scored))
    return [by_epoch[e] for e in ranked]


def read_run(run, members: str | None = None) -> ModelSource:  # noqa: ANN001 - RunDir
    """A run's members (top-k validated epochs, or the best one), config and preprocessing."""
    from engine import checkpoints as ckpt
    from engine.trainer import run_config

    config = run_config(run)
    runtime = run.read_config().get("runtime") or {}
    prep = run_preprocessing(config, runtime.get("input"), f"run {run.run_id}")
    config.set_image_shape(prep.image_shape)
    directory = run.checkpoints_dir
    scored = ensemble_candidates(directory)
    notes = []
    ensemble = run.read_ensemble() or {}
    test = dict(zip(ensemble.get("members") or [], ensemble.get("member_accuracies") or []))
    if not scored:
        if not ckpt.list_checkpoints(directory):
            raise UserError(f"Run {run.run_id} has no checkpoint yet; train it for at least one "
                            f"epoch (`mamlpp resume {run.run_id}`) before predicting with it.")
        name, tensors, meta, _ = ckpt.load_latest_valid(directory)
        notes.append(f"run {run.run_id} has no validated epoch yet; using its newest "
                     f"checkpoint {name}")
        chosen = [Member(name, meta.get("epoch"), None, tensors)]
        choice = "latest"
    else:
        top_k = config.eval.ensemble_top_k
        choice = members or ("ensemble" if top_k > 1 and len(scored) > 1 else "best")
        picked = scored[:top_k] if choice == "ensemble" else scored[:1]
        if choice == "ensemble" and len(picked) == 1:
            notes.append(f"run {run.run_id} has one validated epoch so far; the ensemble is "
                         "that one network")
        chosen = []
        for acc, epoch, name in picked:
            tensors, _ = ckpt.load_checkpoint(directory, name)
            chosen.append(Member(name, epoch, acc, tensors, test.get(epoch)))
    history = []
    for name in ckpt.list_checkpoints(directory):
        try:
            history = list(ckpt.read_sidecar(directory, name).get("history") or [])
            break
        except ckpt.CheckpointError:
            continue
    figures = {"validation": history, "ensemble": ensemble or None}
    return ModelSource("run", run.path, run.run_id, config, prep, chosen, choice, figures, notes)


# ---- the model --------------------------------------------------------------------------------

def load(ref: str | Path, members: str | None = None, device: str = "cpu") -> FewShotModel:
    """A trained model from a run (id, prefix or folder) or an export folder.

    members: "ensemble" (the top-k validated epochs, logits averaged; the default when the run
    has more than one) or "best" (the best validation epoch). device: "cpu", "cuda" or "auto".
    """
    from engine.trainer import pick_device

    return FewShotModel(resolve_source(ref, members), pick_device(device))


@contextmanager
def _evaluation_threads(device: torch.device, workers: int, tasks: int):
    """Run `tasks` tasks with the intra-op thread count of evaluation's batches (which hold
    at least `workers` tasks): threads // workers per op."""
    if device.type != "cpu" or workers <= 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers) * min(tasks, workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


GROUP_BYTES = 256 << 20  # first-layer activations of one query group


def query_groups(n: int, size: int) -> list[torch.Tensor]:
    """Query indices of ceil(n / size) groups, dealt round-robin: group g holds g, g + G, ..."""
    groups = max(1, math.ceil(n / max(1, size)))
    return [torch.arange(g, n, groups) for g in range(groups)]


class FewShotModel:
    """A trained MAML++ model (one network or an ensemble) ready to adapt to new classes."""

    def __init__(self, source: ModelSource, device: torch.device | str = "cpu") -> None:
        from engine.learner import MetaLearner

        self.source = source
        self.config = source.config
        self.preprocessing = source.preprocessing
        self.members = source.members
        self.notes = list(source.notes)
        self.device = torch.device(device)
        self.learner = MetaLearner(self.config, self.device)
        for m in self.members:  # refuse damaged members now, not at the first prediction
            self._load(m)

    @property
    def ways(self) -> int:
        return self.config.data.ways

    @property
    def max_query_group(self) -> int:
        """Most queries predicted in one pass: about GROUP_BYTES of first-layer activations,
        and at least the run's own query set (ways x queries)."""
        _, h, w = self.preprocessing.image_shape
        per_image = self.config.model.filters * h * w * 4
        return max(self.config.data.ways * self.config.data.queries, GROUP_BYTES // per_image)

    def _load(self, member: Member) -> None:
        try:
            self.learner.load_state_tensors(member.tensors)
        except (ValueError, KeyError) as e:
            raise UserError(f"Member {member.name} of {self.source.label} does not fit its "
                            f"config ({e}); the {self.source.kind} is damaged.") from None

    def pixels(self, images: Sequence[Any], where: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, int]:
        """Images -> (uint8 [N, C, S, S] as the run's dataset stores them, colour conversions)."""
        return self.preprocessing.pixels(list(images), list(where) if where else None)

    def adapt(self, images: Sequence[Any] | torch.Tensor, labels: Sequence[Any],
              steps: int | None = None) -> AdaptedModel:
        """The model adapted to a support set: `images` (PIL images, image tensors [C, H, W]
        or a batch [N, C, H, W], or file paths) with one label each (any sortable labels;
        the classes are the sorted distinct labels)."""
        images = _as_list(images)
        labels = list(labels)
        if len(images) != len(labels):
            raise UserError(f"adapt got {len(images)} images and {len(labels)} labels; give one "
                            "label per support image.")
        pixels, converted = self.pixels(images)
        return self.adapt_pixels(pixels, labels, steps, converted)

    def adapt_pixels(self, pixels: torch.Tensor, labels: Sequence[Any],
                     steps: int | None = None, converted: int = 0) -> AdaptedModel:
        """As `adapt`, from uint8 pixels already preprocessed ([N, C, S, S])."""
        labels = list(labels)
        if not labels:
            raise UserError("The support set is empty; give at least one image per class.")
        try:
            classes = sorted(set(labels))
        except TypeError:
            classes = list(dict.fromkeys(labels))
        if len(classes) < 2:
            raise UserError(f"The support set has one class ({classes[0]!r}); give at least 2 "
                            "classes to tell apart.")
        if len(classes) > self.ways:
            raise UserError(f"The support set has {len(classes)} classes but the model is "
                            f"{self.ways}-way (its classifier has {self.ways} outputs); give at "
                            f"most {self.ways} classes, or train a run with "
                            f"data.ways={len(classes)}.")
        if steps is not None and steps < 1:
            raise UserError(f"steps must be at least 1 (got {steps}).")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[c] for c in labels], dtype=torch.int64)
        order = torch.argsort(y, stable=True)  # class-major, as the sampler lays out tasks
        notes = []
        if len(classes) < self.ways:
            notes.append(f"{len(classes)} classes on a {self.ways}-way model: outputs "
                         f"0-{len(classes) - 1} are used, probabilities are over these "
                         f"{len(classes)} classes")
        if converted:
            target = "RGB" if self.preprocessing.channels == 3 else "grayscale"
            notes.append(f"converted {converted} support image{'s' if converted > 1 else ''} to "
                         f"{target}, as the model takes {target} images")
        return AdaptedModel(self, classes, pixels[order], y[order], steps, notes)


def _as_list(images: Sequence[Any] | torch.Tensor) -> list[Any]:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, (str, Path, torch.Tensor)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


class AdaptedModel:
    """A model adapted to one support set; `classes[i]` is probability column i."""

    def __init__(self, model: FewShotModel, classes: list[Any], pixels: torch.Tensor,
                 labels: torch.Tensor, steps: int | None, notes: list[str]) -> None:
        self.model = model
        self.classes = classes
        self.support_pixels = pixels
        self.support_labels = labels
        self.steps = steps or model.config.train.eval_inner_steps
        self.notes = notes
        self.max_query_group = model.max_query_group

    def logits(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Query logits [N, classes], averaged over the members."""
        images = _as_list(images)
        pixels, converted = self.model.pixels(images)
        if converted:
            target = "RGB" if self.model.preprocessing.channels == 3 else "grayscale"
            self.notes.append(f"converted {converted} query image{'s' if converted > 1 else ''} "
                              f"to {target}")
        return self.logits_from_pixels(pixels)

    def predict_proba(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, classes] (softmax of the averaged logits)."""
        return torch.softmax(self.logits(images), dim=-1)

    def predict(self, images: Sequence[Any] | torch.Tensor) -> list[Any]:
        """The most probable class of each image."""
        return [self.classes[i] for i in self.logits(images).argmax(-1).tolist()]

    def logits_from_pixels(self, query: torch.Tensor, per_member: bool = False) -> torch.Tensor:
        """uint8 query pixels [N, C, S, S] -> averaged logits [N, classes] (or, with
        per_member, each member's [members, N, classes])."""
        model = self.model
        n = query.shape[0]
        if n == 0:
            raise UserError("No query images to predict.")
        prep = model.preprocessing
        xs = prep.to_float(self.support_pixels)
        xq = prep.to_float(query)
        by_size: dict[int, list[torch.Tensor]] = {}
        for index in query_groups(n, self.max_query_group):
            by_size.setdefault(len(index), []).append(index)
        member_logits = []
        for member in model.members:
            model._load(member)
            out = torch.empty(n, model.ways)
            for size, parts in by_size.items():
                b = len(parts)
                batch = TaskBatch(
                    xs.expand(b, *xs.shape).contiguous(),
                    self.support_labels.expand(b, -1).contiguous(),
                    torch.stack([xq[index] for index in parts]),
                    torch.zeros(b, size, dtype=torch.int64))
                with _evaluation_threads(model.device, model.learner.paths.task_threads, b):
                    result = model.learner.evaluate(batch, steps=self.steps)
                logits = result.logits.float().cpu()
                for index, lg in zip(parts, logits):
                    out[index] = lg
            member_logits.append(out)
        stacked = torch.stack(member_logits)  # as engine.evaluation.ensemble averages them
        k = len(self.classes)
        return stacked[..., :k] if per_member else stacked.mean(0)[:, :k]


# ---- support and query folders (the CLI's inputs) ---------------------------------------------

def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def support_folder(path: Path) -> tuple[list[str], list[list[Path]]]:
    """(class names = sorted sub-folder names, their files sorted by name)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"--support {path} is not a folder; give a folder with one sub-folder "
                        "of images per class.")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"--support {path} has no class sub-folders; put each class's images "
                        "in a sub-folder named after the class.")
    files = [_files(c) for c in classes]
    for c, f in zip(classes, files):
        if not f:
            raise UserError(f"Support class {c.name} ({c}) has no images; give at least one "
                            "image per class.")
    return [c.name for c in classes], files


def query_files(paths: Sequence[Path], classes: Sequence[str]) -> list[tuple[Path, str | None]]:
    """(file, true class or None) for every query: files as given; a folder's files (sorted),
    and one level of its sub-folders; images whose folder is named after a support class are
    labelled with it (then `predict` also reports accuracy)."""
    names = set(classes)
    out: list[tuple[Path, str | None]] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_file():
            out.append((p, p.parent.name if p.parent.name in names else None))
        elif p.is_dir():
            label = p.name if p.name in names else None
            out += [(f, label) for f in _files(p)]
            for sub in sorted(d for d in p.iterdir() if d.is_dir()
                              and not d.name.startswith(".")):
                sub_label = sub.name if sub.name in names else None
                out += [(f, sub_label) for f in _files(sub)]
        else:
            raise UserError(f"--query {p} does not exist; give image files or folders of them.")
    if not out:
        raise UserError(f"--query {', '.join(map(str, paths))} holds no files.")
    return out


@dataclass
class Prediction:
    classes: list[str]
    paths: list[str]
    labels: list[str | None]
    probabilities: torch.Tensor  # [N, classes]
    logits: torch.Tensor  # [N, classes], averaged over members
    members: list[Member]
    choice: str
    steps: int
    seconds: dict[str, float]
    notes: list[str]

    @property
    def predicted(self) -> list[str]:
        return [self.classes[i] for i in self.probabilities.argmax(-1).tolist()]

    @property
    def accuracy(self) -> float | None:
        pairs = [(p, y) for p, y in zip(self.predicted, self.labels) if y is not None]
        return sum(p == y for p, y in pairs) / len(pairs) if pairs else None

    @property
    def labelled(self) -> int:
        return sum(y is not None for y in self.labels)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form (DESIGN: classes, predictions with path, predicted and
        probabilities, accuracy; plus the logits, members and timings)."""
        preds = []
        for i, path in enumerate(self.paths):
            row = self.probabilities[i].tolist()
            preds.append({"path": path, "predicted": self.predicted[i],
                          "probabilities": dict(zip(self.classes, row)),
                          "label": self.labels[i],
                          "logits": self.logits[i].tolist()})
        return {"classes": self.classes, "predictions": preds, "accuracy": self.accuracy,
                "labelled": self.labelled,
                "members": [{"epoch": m.epoch, "val_accuracy": m.val_accuracy,
                             "checkpoint": m.name} for m in self.members],
                "member_choice": self.choice, "steps": self.steps,
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "notes": self.notes}


def _read_images(model: FewShotModel, files: Sequence[Path]
                 ) -> tuple[torch.Tensor, list[int], list[str], int]:
    """(uint8 pixels of the readable files, their indices, the unreadable ones, conversions)."""
    from engine.preprocess import read_file

    prep = model.preprocessing
    rows, keep, bad, converted = [], [], [], 0
    for i, f in enumerate(files):
        try:
            pixels, conv = prep.prepare(read_file(f))
        except ImageReadError:
            bad.append(str(f))
            continue
        rows.append(torch.from_numpy(pixels))
        keep.append(i)
        converted += conv
    stacked = torch.stack(rows) if rows else torch.empty(0, *prep.image_shape, dtype=torch.uint8)
    return stacked, keep, bad, converted


def predict_folders(model: FewShotModel, support: Path, queries: Sequence[Path],
                    steps: int | None = None) -> Prediction:
    """`mamlpp predict`: adapt on the support folder's classes, predict every query file."""
    t0 = time.perf_counter()
    classes, class_files = support_folder(support)
    notes: list[str] = []
    pixels, labels, converted = [], [], 0
    for name, files in zip(classes, class_files):
        px, keep, bad, conv = _read_images(model, files)
        if not keep:
            raise UserError(f"Support class {name} ({Path(support) / name}) has no readable "
                            f"images ({len(bad)} file{'s' if len(bad) > 1 else ''} could not be "
                            "read as images).")
        if bad:
            notes.append(f"skipped {len(bad)} unreadable support file{'s' if len(bad) > 1 else ''}"
                         f" in {name} ({Path(bad[0]).name}{', ...' if len(bad) > 1 else ''})")
        pixels.append(px)
        labels += [name] * len(keep)
        converted += conv
    shots = {name: labels.count(name) for name in classes}
    wanted = model.config.data.shots
    if set(shots.values()) != {wanted}:
        counts = sorted(set(shots.values()))
        have = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])
        notes.append(f"the model was trained {wanted}-shot; this support has {have} images per "
                     "class (adaptation takes them all)")
    items = query_files(queries, classes)
    qpx, keep, bad, qconv = _read_images(model, [p for p, _ in items])
    if not keep:
        raise UserError(f"None of the {len(items)} query files is a readable image.")
    if bad:
        notes.append(f"skipped {len(bad)} unreadable or non-image query file"
                     f"{'s' if len(bad) > 1 else ''} ({Path(bad[0]).name}"
                     f"{', ...' if len(bad) > 1 else ''})")
    t_read = time.perf_counter() - t0
    adapted = model.adapt_pixels(torch.cat(pixels), labels, steps, converted)
    notes = adapted.notes + notes
    if qconv:
        target = "RGB" if model.preprocessing.channels == 3 else "grayscale"
        notes.append(f"converted {qconv} query image{'s' if qconv > 1 else ''} to {target}, as "
                     f"the model takes {target} images")
    t1 = time.perf_counter()
    logits = adapted.logits_from_pixels(qpx)
    t_predict = time.perf_counter() - t1
    return Prediction(
        classes=list(classes), paths=[str(items[i][0]) for i in keep],
        labels=[items[i][1] for i in keep], probabilities=torch.softmax(logits, -1),
        logits=logits, members=model.members, choice=model.source.choice, steps=adapted.steps,
        seconds={"read": t_read, "predict": t_predict}, notes=model.notes + notes)
