"""`mamlpp export RUN --to DIR`: a self-contained model folder that `mamlpp predict` and
`mamlpp.load` take without the run directory or the dataset cache.

```
DIR/model.json                          format, config, input preprocessing, members, figures,
                                        and the sha256 and size of every other file
DIR/members/epoch-NNNN.safetensors      one per member: network (net.*), per-step batch norm
                                        (bn.*), learned per-step rates (lslr.*), running sets
                                        (stats.*); no optimiser state
DIR/README.md                           the model card, written from model.json
```

Loading reads JSON and safetensors only (no pickle, no code from the files), and checks every
file listed in model.json against its sha256 before using it: a modified or truncated file is
refused with one sentence. The folder is written next to DIR and renamed into place, so an
interrupted export leaves nothing half-written; an existing non-empty DIR is never touched.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.adapt import Member, ModelSource
from engine.errors import UserError
from engine.preprocess import Preprocessing

FORMAT = "mamlpp-export/1"
MANIFEST = "model.json"
CARD = "README.md"
_GROUPS = ("net.", "bn.", "lslr.", "stats.")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mamlpp")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def export_model(source: ModelSource, to: Path) -> dict[str, Any]:
    """Write `source` (a run's chosen members) to the folder `to`; returns model.json."""
    from safetensors.torch import save

    to = Path(to).expanduser()
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise UserError(f"--to {to} already exists and is not an empty folder; give a new folder "
                        "(an export never overwrites files).")
    parent = to.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.tmp-", dir=parent))
    except OSError as e:
        raise UserError(f"Cannot write the export next to {to}: {e.strerror or e}.") from None
    try:
        (tmp / "members").mkdir()
        files: dict[str, dict[str, Any]] = {}
        members = []
        for i, m in enumerate(source.members):
            tensors = {k: v.detach().cpu().contiguous() for k, v in m.tensors.items()
                       if k.startswith(_GROUPS)}
            data = save(tensors)
            stem = f"epoch-{m.epoch:04d}" if isinstance(m.epoch, int) else f"member-{i}"
            rel = f"members/{stem}.safetensors"
            _write(tmp / rel, data)
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            members.append({"name": m.name, "epoch": m.epoch, "val_accuracy": m.val_accuracy,
                            "test_accuracy": m.test_accuracy, "file": rel})
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "mamlpp": _version(),
            "torch": torch.__version__,
            "run": source.label,
            "members_choice": source.choice,
            "config": source.config.to_dict(),
            "input": source.preprocessing.to_dict(),
            "members": members,
            "figures": source.figures,
            "files": files,
        }
        card = model_card(manifest).encode()
        _write(tmp / CARD, card)
        files[CARD] = {"sha256": hashlib.sha256(card).hexdigest(), "bytes": len(card)}
        _write(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        os.chmod(tmp, 0o755)
        if to.exists():
            to.rmdir()  # empty, checked above
        os.rename(tmp, to)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"Cannot write the export {to}: {e.strerror or e}.") from None
        raise
    return manifest


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def model_card(m: dict[str, Any]) -> str:
    """README.md of an export, from its model.json."""
    cfg, d, t, p = m["config"], m["config"]["data"], m["config"]["train"], m["config"]["maml_pp"]
    prep = Preprocessing.from_dict(m["input"])
    members = m["members"]
    figures = m.get("figures") or {}
    ens = figures.get("ensemble") or {}
    epochs = [x["epoch"] for x in members]
    if m["members_choice"] == "ensemble":
        who = (f"an ensemble of {len(members)} networks (epochs {', '.join(map(str, epochs))}, "
               "the top by validation accuracy); their query logits are averaged")
    elif m["members_choice"] == "best":
        who = f"one network, the best validation epoch ({epochs[0]})"
    else:
        who = f"one network, the run's newest checkpoint ({members[0]['name']})"
    lines = [
        f"# mamlpp model: {cfg['name']} on {d['dataset']}",
        "",
        f"MAML++ few-shot classifier exported from run `{m['run']}` on {m['created']} "
        f"(mamlpp {m['mamlpp']}, torch {m['torch']}). It is {who}.",
        "",
        "## Task",
        "",
        f"- trained {d['ways']}-way {d['shots']}-shot on `{d['dataset']}` ({d['queries']} "
        f"{'query' if d['queries'] == 1 else 'queries'} per class in a task); adapts in "
        f"{t['eval_inner_steps']} inner steps with learned per-layer, per-step rates and "
        f"per-step batch norm (`bn_eval_stats = \"{p['bn_eval_stats']}\"`)",
        f"- input: {prep.describe()}",
        f"- training: {t['epochs']} epochs x {t['iters_per_epoch']} iterations, meta-batch "
        f"{t['meta_batch']}, meta_lr {t['meta_lr']}, {cfg['model']['filters']} filters x "
        f"{cfg['model']['stages']} stages, seed {t['seed']}",
        "",
        "## Figures",
        "",
        "| member | validation accuracy | test accuracy |",
        "| --- | --- | --- |",
    ]
    for x in members:
        label = f"epoch {x['epoch']}" if x["epoch"] is not None else x["name"]
        lines.append(f"| {label} | {_pct(x['val_accuracy'])} | {_pct(x['test_accuracy'])} |")
    if ens and sorted(ens.get("members") or []) == sorted(epochs) and len(epochs) > 1:
        lines.append(f"| ensemble | | {_pct(ens.get('accuracy'))} +- "
                     f"{100 * (ens.get('ci95') or 0):.2f} |")
    lines.append("")
    if ens:
        lines.append(f"Test accuracy: mean over {ens.get('tasks')} fixed test tasks of the "
                     f"run's test classes, with its 95% confidence interval "
                     f"(`mamlpp ensemble` of epochs {ens.get('members')}).")
    else:
        lines.append("The run had no test ensemble yet (`mamlpp ensemble RUN`), so no test "
                     "accuracy is recorded.")
    history = figures.get("validation") or []
    if history:
        lines += ["", "Validation accuracy per epoch: "
                  + ", ".join(f"{h['epoch']}: {_pct(h['accuracy'])}" for h in history) + "."]
    lines += [
        "",
        "## Use",
        "",
        "```sh",
        "mamlpp predict THIS_FOLDER --support SUPPORT_DIR --query QUERY_DIR_OR_FILES",
        "```",
        "",
        "```python",
        "import mamlpp",
        "model = mamlpp.load(\"THIS_FOLDER\")",
        "adapted = model.adapt(support_images, support_labels)",
        "probs = adapted.predict_proba(query_images)  # columns: adapted.classes",
        "```",
        "",
        f"SUPPORT_DIR holds one sub-folder per class (at most {d['ways']} classes) with a few "
        "images each; class names are the folder names."
        + (" The queries are predicted together as one query set, whose own batch statistics "
           "normalise them (as in evaluation): give several that mix the classes."
           if p["bn_eval_stats"] == "batch" else ""),
        "",
        "## Files",
        "",
        "`model.json` records the config, the input preprocessing, the members and the sha256 of "
        "every other file; loading checks them all and reads only JSON and safetensors (no code "
        "runs from these files).",
        "",
    ]
    return "\n".join(lines)


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"The export {path} is damaged or was modified ({why}); export the run "
                     "again with `mamlpp export RUN --to DIR`.")


def read_export(path: Path, members: str | None = None) -> ModelSource:
    """An export folder, every listed file verified by sha256 (JSON and safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from engine.config import ConfigError, from_dict

    path = Path(path).expanduser()
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a mamlpp export (it has no {MANIFEST}).") from None
    except (OSError, ValueError, UnicodeDecodeError):
        raise _damaged(path, f"{MANIFEST} is not readable JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a mamlpp export ({MANIFEST} is not of format {FORMAT}).")
    files = manifest.get("files")
    listed = manifest.get("members")
    if not isinstance(files, dict) or not isinstance(listed, list) or not listed:
        raise _damaged(path, f"{MANIFEST} lists no files or members")
    data: dict[str, bytes] = {}
    root = path.resolve()
    for rel, info in files.items():
        target = (path / rel).resolve()
        if not isinstance(info, dict) or root not in target.parents:
            raise _damaged(path, f"{MANIFEST} lists {rel!r} outside the folder")
        try:
            blob = target.read_bytes()
        except OSError:
            raise _damaged(path, f"{rel} is missing") from None
        if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
            raise _damaged(path, f"sha256 mismatch: {rel} is not the file that was exported")
        data[rel] = blob
    try:
        config = from_dict(manifest["config"])
        prep = Preprocessing.from_dict(manifest.get("input"), f"the export {path}")
    except (ConfigError, KeyError, TypeError) as e:
        raise _damaged(path, f"its config is not valid: {e}") from None
    config.set_image_shape(prep.image_shape)
    chosen = manifest.get("members_choice", "ensemble")
    if members == "best" and len(listed) > 1:
        ranked = sorted(range(len(listed)),
                        key=lambda i: (-(listed[i].get("val_accuracy") or 0), i))
        listed = [listed[ranked[0]]]
        chosen = "best"
    elif members == "ensemble" and len(listed) == 1 and chosen != "ensemble":
        raise UserError(f"The export {path} holds one network ({chosen}); export the run again "
                        "with --members ensemble for an ensemble.")
    loaded = []
    for x in listed:
        rel = x.get("file") if isinstance(x, dict) else None
        if rel not in data:
            raise _damaged(path, f"member file {rel!r} is not among the files {MANIFEST} hashes")
        try:
            tensors = st_load(data[rel])
        except (SafetensorError, ValueError) as e:
            raise _damaged(path, f"{rel} is not a safetensors file: {e}") from None
        loaded.append(Member(x.get("name") or rel, x.get("epoch"), x.get("val_accuracy"),
                             tensors, x.get("test_accuracy")))
    return ModelSource("export", path, str(path), config, prep, loaded, chosen,
                       manifest.get("figures") or {}, [])
