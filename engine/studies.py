"""Studies: one configuration over seeds, a grid of a few keys, or the ablation ladder.

A study is the folder `<root>/studies/<study_id>/`:

    study.json    what was asked, written once: the base (preset or config file, --set
                  overrides), the variants with their overrides, the seeds, and every member's
                  resolved config, its digest and the exact `mamlpp run` arguments that make it
    members/      one symlink per member that has a run: `<nn>-<variant>-s<seed>` ->
                  `../../../runs/<run_id>` (the bookkeeping that notices a deleted run)
    study.lock    held (`fcntl.flock`) by the process running the study, for its whole life
    members.lock  held for a moment while a member's run is looked up and created
    study.log     the output of a detached study process

Members are ordinary runs in `<root>/runs/`, tagged in their config.json with
`"study": {"id", "variant", "seed"}` (beside "runtime"; neither enters the config digest), so
`watch`, `show`, `resume` and `ensemble` work on them unchanged, and a member started by hand
(from `--dry-run`'s commands, on any scheduler) is recognised by its tag wherever it ran.

One member, one run: a run is created only under `members.lock`, after a scan of the runs folder
for the member's tag finds none, and its config.json (with the tag) is written atomically before
anything else can see it. A process killed after creating the run but before linking it leaves a
tagged run that the next scan finds and links; it never leads to a second run.

This module does not import torch, so listing and showing studies stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import ablation, process_lock
from engine.config import Config, ConfigError, from_dict, resolve
from engine.errors import UserError
from engine.paths import runs_root
from engine.run_store import RunDir, atomic_write_json, create_run, list_runs, read_json

STUDY_FILE = "study.json"
FORMAT = 1
KINDS = ("sweep", "ablate")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SWEEP_VARIANT = "base"  # the one variant of a sweep without --grid


def studies_root() -> Path:
    """`<root>/studies`, beside `<root>/runs`."""
    return runs_root().parent / "studies"


# ---------------------------------------------------------------- parsing the request


def parse_seeds(text: str | None) -> list[int] | None:
    """`"0,1,2"` -> [0, 1, 2]; a UserError for anything but distinct whole numbers."""
    if text is None:
        return None
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(r"\d+", part):
            raise UserError(f"--seeds takes whole numbers separated by commas, like 0,1,2 "
                            f"(got {part!r}).")
        if int(part) in seeds:
            raise UserError(f"Seed {part} is given twice in --seeds.")
        seeds.append(int(part))
    return seeds


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["train.inner_steps=1,3,5"]` -> {"train.inner_steps": ["1", "3", "5"]} (values are
    checked against the config when the members are resolved)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid {item!r} must look like section.key=v1,v2.")
        key, text = (s.strip() for s in item.split("=", 1))
        values = [v.strip() for v in text.split(",")]
        if not key or not all(values):
            raise UserError(f"--grid {item!r} must look like section.key=v1,v2.")
        if key == "train.seed":
            raise UserError("Give seeds with --seeds, not --grid train.seed=...")
        if key in grid:
            raise UserError(f"--grid {key} is given twice; give all its values in one --grid.")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {key} repeats a value ({text}).")
        grid[key] = values
    return grid


def toml_value(value: Any) -> str:
    """The `--set` text of a value: true, 3, 0.001, "loop"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _override_keys(overrides: list[str]) -> list[str]:
    return [item.split("=", 1)[0].strip() for item in overrides]


# ---------------------------------------------------------------- planning members


@dataclass
class Plan:
    """What a sweep or ablate command asks for, resolved and validated, before any id."""

    kind: str
    request: dict[str, Any]  # preset, config_file, overrides, seeds, grid / ladder
    base: dict[str, Any]  # the resolved base config
    variants: list[dict[str, Any]]  # {"name", "overrides": {key: value}, "note"}
    seeds: list[int]
    members: list[dict[str, Any]] = field(default_factory=list)  # variant, seed, digest, config


def _resolve_member(preset: str | None, config_file: Path | None, overrides: list[str],
                    variant: dict[str, Any], seed: int) -> Config:
    extra = [f"{k}={toml_value(v)}" for k, v in variant["overrides"].items()]
    return resolve(preset, config_file, [*overrides, *extra, f"train.seed={seed}"])


def _finish_plan(plan: Plan) -> Plan:
    req = plan.request
    config_file = Path(req["config_file"]) if req["config_file"] else None
    for variant in plan.variants:
        for seed in plan.seeds:
            cfg = _resolve_member(req["preset"], config_file, req["overrides"], variant, seed)
            plan.members.append({"variant": variant["name"], "seed": seed,
                                 "digest": cfg.digest(), "config": cfg.to_dict()})
    return plan


def _request(preset: str | None, config_file: Path | None, overrides: list[str],
             seeds: list[int] | None) -> tuple[dict[str, Any], Config]:
    if preset is not None and config_file is not None:
        raise UserError("Give either a preset or --config, not both.")
    if preset is None and config_file is None:
        preset = "quickstart"
    config_file = Path(config_file).resolve() if config_file is not None else None
    base = resolve(preset, config_file, overrides)
    if seeds is not None and "train.seed" in _override_keys(overrides):
        raise UserError("Give seeds with --seeds, not --set train.seed=...")
    request = {"preset": preset, "config_file": str(config_file) if config_file else None,
               "overrides": list(overrides), "seeds": seeds}
    return request, base


def plan_sweep(preset: str | None, config_file: Path | None, overrides: list[str],
               seeds: list[int] | None, grid: dict[str, list[str]]) -> Plan:
    """The same configuration over seeds, times the cartesian product of the grid's values."""
    request, base = _request(preset, config_file, overrides, seeds)
    for key in grid:
        if len(key.split(".")) != 2:
            raise UserError(f"--grid {key} must name a config key as section.key.")
        if key in _override_keys(overrides):
            raise UserError(f"{key} is both in --grid and --set; give it in one of them.")
    parsed: dict[str, list[Any]] = {}
    for key, values in grid.items():
        parsed[key] = []
        for text in values:
            try:  # a wrong key or value: the config's own sentence, naming the key
                cfg = resolve(request["preset"], _path(request), [*overrides, f"{key}={text}"])
            except ConfigError as e:
                raise UserError(f"--grid {key}: {e}") from None
            section, name = key.split(".")
            parsed[key].append(getattr(getattr(cfg, section), name))
    short = _short_keys(list(parsed))
    variants = []
    for point in itertools.product(*parsed.values()):
        overrides_v = dict(zip(parsed, point))
        name = ",".join(f"{short[k]}={_show(v)}" for k, v in overrides_v.items())
        variants.append({"name": name or SWEEP_VARIANT, "overrides": overrides_v, "note": ""})
    request["grid"] = grid
    return _finish_plan(Plan("sweep", request, base.to_dict(), variants,
                             seeds if seeds is not None else [base.train.seed]))


def plan_ablation(preset: str | None, config_file: Path | None, overrides: list[str],
                  seeds: list[int] | None, names: list[str] | None = None,
                  leave_one_out: bool = False) -> Plan:
    """The ladder's variants (or the leave-one-out rows) of one base config, times seeds."""
    request, base = _request(preset, config_file, overrides, seeds)
    rows = ablation.select(ablation.ladder(leave_one_out), names, leave_one_out)
    base_dict = base.to_dict()
    ablation.check_base(base_dict, overrides)
    variants = [{"name": v.name, "overrides": v.overrides(base_dict), "note": v.note}
                for v in rows]
    request["ladder"] = "leave-one-out" if leave_one_out else "cumulative"
    request["variants"] = [v.name for v in rows]
    return _finish_plan(Plan("ablate", request, base_dict, variants,
                             seeds if seeds is not None else [base.train.seed]))


def _path(request: dict[str, Any]) -> Path | None:
    return Path(request["config_file"]) if request["config_file"] else None


def _short_keys(keys: list[str]) -> dict[str, str]:
    """`train.inner_steps` -> `inner_steps` where that last part is unique among the keys."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _show(value: Any) -> str:
    return toml_value(value) if not isinstance(value, str) else value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or "v"


def member_args(study_id: str, request: dict[str, Any], variant: dict[str, Any],
                seed: int) -> list[str]:
    """The `mamlpp run` arguments (after `mamlpp`) that make this member, tagged."""
    if request["config_file"]:
        args = ["run", "--config", request["config_file"]]
    else:
        args = ["run", "--preset", request["preset"]]
    for item in request["overrides"]:
        args += ["--set", item]
    for key, value in variant["overrides"].items():
        args += ["--set", f"{key}={toml_value(value)}"]
    args += ["--set", f"train.seed={seed}", "--study", study_id, "--variant", variant["name"],
             "--no-tui"]
    return args


def run_name(study_id: str, variant: str, seed: int) -> str:
    """The `--name` of a member's run: its id starts `<study>-<variant>-s<seed>`."""
    return f"{study_id}-{_slug(variant)}-s{seed}"


# ---------------------------------------------------------------- the study folder


@dataclass(frozen=True)
class Member:
    index: int  # position of the variant in the study's table
    variant: str
    seed: int
    digest: str
    config: dict[str, Any]
    args: list[str]

    @property
    def key(self) -> str:
        """The name of its link in members/, unique in the study."""
        return f"{self.index:02d}-{_slug(self.variant)}-s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


@dataclass(frozen=True)
class Study:
    path: Path
    data: dict[str, Any]

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def variants(self) -> list[dict[str, Any]]:
        return self.data["variants"]

    @property
    def seeds(self) -> list[int]:
        return self.data["seeds"]

    @property
    def base_name(self) -> str:
        req = self.data["request"]
        return req["preset"] or Path(req["config_file"]).name

    @property
    def members(self) -> list[Member]:
        index = {v["name"]: i for i, v in enumerate(self.variants)}
        return [Member(index[m["variant"]], m["variant"], m["seed"], m["digest"], m["config"],
                       m["args"]) for m in self.data["members"]]

    def member(self, variant: str, seed: int) -> Member | None:
        return next((m for m in self.members if (m.variant, m.seed) == (variant, seed)), None)

    @property
    def links_dir(self) -> Path:
        return self.path / "members"

    @property
    def lock_path(self) -> Path:
        return self.path / "study.lock"

    @property
    def members_lock_path(self) -> Path:
        return self.path / "members.lock"

    @property
    def log_path(self) -> Path:
        return self.path / "study.log"

    def is_running(self) -> bool:
        """Whether a study process holds study.lock right now."""
        return process_lock.is_held(self.lock_path)

    def runner_pid(self) -> int | None:
        return process_lock.holder_pid(self.lock_path)

    def tag(self, member: Member) -> dict[str, Any]:
        return {"id": self.id, "variant": member.variant, "seed": member.seed}

    # -- links

    def linked_run(self, member: Member) -> str | None:
        """The run id members/<key> points to (whether or not that run still exists)."""
        try:
            return Path(os.readlink(self.links_dir / member.key)).name
        except OSError:
            return None

    def link(self, member: Member, run: RunDir) -> None:
        """Point members/<key> at the run (atomically: a new symlink renamed over the old)."""
        self.links_dir.mkdir(exist_ok=True)
        target = os.path.relpath(run.path, self.links_dir)
        path = self.links_dir / member.key
        if self.linked_run(member) == run.run_id and path.exists():
            return
        tmp = self.links_dir / f".{member.key}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
        os.symlink(target, tmp)
        os.replace(tmp, path)

    def unlink_deleted(self, member: Member) -> None:
        """Forget a member's link whose run was deleted (the run itself is gone already)."""
        with contextlib.suppress(FileNotFoundError):
            (self.links_dir / member.key).unlink()


def _validate_id(study_id: str) -> str:
    if not _ID_RE.match(study_id) or len(study_id) > 64:
        raise UserError(f"Study name {study_id!r} must start with a letter or digit and use only "
                        "letters, digits, '.', '_' and '-' (at most 64).")
    return study_id


def _settings(data: dict[str, Any]) -> Any:
    """What must be equal for a rerun with the same --name to continue the study."""
    return (data["kind"], [(v["name"], v["overrides"]) for v in data["variants"]],
            data["seeds"], [(m["variant"], m["seed"], m["digest"]) for m in data["members"]])


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def create_study(plan: Plan, name: str | None = None) -> tuple[Study, bool]:
    """Make the study folder for `plan` (or find the one called `name` with the same
    settings); return it and whether it is new. A different study under `name` is refused."""
    root = studies_root()
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        _validate_id(name)
        path = root / name
        if (path / STUDY_FILE).is_file():
            study = load_study(path)
            data = _study_data(plan, name)
            if _canonical(_settings(data)) != _canonical(_settings(study.data)):
                raise UserError(
                    f"Study {name} already exists with different settings; continue it with "
                    f"`mamlpp study resume {name}` or pick another --name.")
            return study, False
        candidates = [path]
    else:
        stem = f"{plan.kind}-{_slug(plan.request['preset'] or 'config')}"
        candidates = (root / f"{stem}-{secrets.token_hex(2)}" for _ in range(100))
    for path in candidates:
        try:
            path.mkdir()
        except FileExistsError:
            if name is not None and not (path / STUDY_FILE).exists():
                # a folder without study.json: a creation that died half-way, or not ours
                if any(path.iterdir()):
                    raise UserError(
                        f"{path} exists and is not a study; pick another --name.") from None
                break
            continue
        break
    else:  # pragma: no cover - 100 collisions of 16 random bits
        raise UserError(f"Could not create a unique study folder in {root}; try again.")
    atomic_write_json(path / STUDY_FILE, _study_data(plan, path.name))
    return load_study(path), True


def _study_data(plan: Plan, study_id: str) -> dict[str, Any]:
    variants = {v["name"]: v for v in plan.variants}
    members = [dict(m, args=member_args(study_id, plan.request, variants[m["variant"]],
                                        m["seed"]))
               for m in plan.members]
    return {"format": FORMAT, "id": study_id, "kind": plan.kind, "created": time.time(),
            "request": plan.request, "base": plan.base, "variants": plan.variants,
            "seeds": plan.seeds, "members": members}


def load_study(path: Path) -> Study:
    try:
        data = read_json(Path(path) / STUDY_FILE)
    except FileNotFoundError:
        raise UserError(f"{path} is not a study (it has no {STUDY_FILE}).") from None
    except ValueError:
        raise UserError(f"Study {Path(path).name} has a corrupt {STUDY_FILE}.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"Study {Path(path).name} has a {STUDY_FILE} this version cannot read.")
    return Study(Path(path), data)


def list_studies() -> list[Study]:
    """Every study under the studies root, oldest first."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in studies_root().iterdir():
            if (entry / STUDY_FILE).is_file():
                with contextlib.suppress(UserError):
                    study = load_study(entry)
                    out.append((study.data.get("created", 0), study.id, study))
    return [s for _, _, s in sorted(out, key=lambda t: t[:2])]


def find_study(ref: str) -> Study:
    """The study whose id is `ref` or starts with `ref`; a UserError if none or several."""
    ref = ref.strip()
    if not ref:
        raise UserError("Give a study id or a prefix of one; list studies with `mamlpp studies`.")
    studies = list_studies()
    for study in studies:
        if study.id == ref:
            return study
    matches = [s for s in studies if s.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"No study matches {ref!r}; list studies with `mamlpp studies`.")
    names = ", ".join(s.id for s in matches)
    raise UserError(f"Study {ref!r} is ambiguous, it matches {names}; give more of the id.")


def study_matches(ref: str) -> list[Study]:
    """Studies `ref` names: an exact id alone, else every study whose id starts with it."""
    studies = list_studies()
    exact = [s for s in studies if s.id == ref]
    return exact or [s for s in studies if s.id.startswith(ref)]


# ---------------------------------------------------------------- locks


def hold_study_lock(study: Study, wait: float = 0.5) -> None:
    """Hold study.lock for the rest of this process's life; a UserError if another holds it."""
    process_lock.hold(study.lock_path, lambda pid: (
        f"Study {study.id} is already running (pid {pid}); watch it with "
        f"`mamlpp watch {study.id}`."), wait)


def release_study_lock(study: Study) -> None:
    process_lock.release(study.lock_path)


@contextlib.contextmanager
def members_lock(study: Study) -> Iterator[None]:
    """Exclusive while a member's run is looked up and created (any process, any command)."""
    fd = os.open(study.members_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- member runs


_TAGS: dict[str, tuple[int, Any]] = {}  # config.json path -> (mtime_ns, its study tag)


def run_tag(run: RunDir) -> dict[str, Any] | None:
    """The run's `"study"` entry in config.json (cached by the file's mtime)."""
    path = run.config_path
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    cached = _TAGS.get(str(path))
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        tag = read_json(path).get("study")
    except (OSError, ValueError, AttributeError):
        tag = None
    tag = tag if isinstance(tag, dict) else None
    _TAGS[str(path)] = (mtime, tag)
    return tag


def tagged_runs(study_id: str) -> list[tuple[RunDir, dict[str, Any]]]:
    """Every run in the runs folder tagged with this study, oldest first."""
    out = []
    for run in list_runs():
        tag = run_tag(run)
        if tag and tag.get("id") == study_id:
            out.append((run, tag))
    return out


def config_of_run(run: RunDir) -> Config:
    """The run's config as the engine reads it (without "runtime" and "study"), torch-free."""
    raw = dict(run.read_config())
    raw.pop("runtime", None)
    raw.pop("study", None)
    return from_dict(raw)


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                if x.get(key) != y.get(key):
                    return f"{section}.{key} is {x.get(key)!r} where the study asked {y.get(key)!r}"
        elif x != y and section not in ("name", "description"):
            return f"{section} is {x!r} where the study asked {y!r}"
    return "it differs"


def check_member_config(study: Study, member: Member, run: RunDir) -> None:
    """A UserError unless the run's config is the one the study asked for this member."""
    where = f"Run {run.run_id} ({member.label} of study {study.id})"
    try:
        cfg = config_of_run(run)
    except UserError as e:
        raise UserError(f"{where} has a config.json the study cannot use ({e}); put back the "
                        f"original or move the run out of {runs_root()}.") from None
    if cfg.digest() != member.digest:
        what = _first_difference(cfg.to_dict(), member.config)
        raise UserError(f"{where} was edited by hand: {what}; put its config.json back, or "
                        f"move the run out of {runs_root()} and run `mamlpp study resume "
                        f"{study.id} --rerun-deleted`.")


@dataclass
class MemberRun:
    """A member and where it stands: its run (None before it has one) and that run's status."""

    member: Member
    run: RunDir | None
    status: dict[str, Any]
    duplicates: list[str] = field(default_factory=list)  # other runs with the same tag
    deleted: str | None = None  # the linked run id, when that run no longer exists

    @property
    def state(self) -> str:
        if self.deleted:
            return "deleted"
        if self.run is None:
            return "not started"
        return self.status.get("state") or "stopped"

    @property
    def finished(self) -> bool:
        return self.state == "finished"


def _pick(runs: list[RunDir]) -> tuple[RunDir, list[dict[str, Any]]]:
    """Of several runs of one member: the finished one, else the furthest, else the oldest."""
    statuses = [r.read_status() for r in runs]
    order = sorted(range(len(runs)), key=lambda i: (statuses[i].get("state") != "finished",
                                                    -(statuses[i].get("iteration") or 0), i))
    return runs[order[0]], [statuses[i] for i in order]


def member_runs(study: Study, *, strict: bool = True, link: bool = False,
                rerun_deleted: bool = False) -> list[MemberRun]:
    """Each member with its run, found by tag in the runs folder.

    strict: refuse (UserError, one sentence) a tagged run the study has no member for, a run
    whose config was edited by hand and a member whose linked run was deleted (unless
    `rerun_deleted`, which forgets the link so the member starts afresh). link: record found
    runs in members/ (`study collect` and the runner do; `show` only reads)."""
    by_member: dict[tuple[str, int], list[RunDir]] = {}
    for run, tag in tagged_runs(study.id):
        member = study.member(tag.get("variant"), tag.get("seed"))
        if member is None:
            if strict:
                raise UserError(
                    f"Run {run.run_id} is tagged for study {study.id} as variant "
                    f"{tag.get('variant')!r} seed {tag.get('seed')!r}, which the study does not "
                    f"have; move it out of {runs_root()}.")
            continue
        by_member.setdefault((member.variant, member.seed), []).append(run)
    out = []
    for member in study.members:
        runs = by_member.get((member.variant, member.seed), [])
        linked = study.linked_run(member)
        if not runs:
            if linked and not (runs_root() / linked).exists():
                if rerun_deleted:
                    study.unlink_deleted(member)
                elif strict:
                    raise UserError(
                        f"Run {linked} ({member.label} of study {study.id}) was deleted; start "
                        f"that member afresh with `mamlpp study resume {study.id} "
                        "--rerun-deleted`.")
                else:
                    out.append(MemberRun(member, None, {}, deleted=linked))
                    continue
            elif linked and strict:
                raise UserError(
                    f"Run {linked} ({member.label} of study {study.id}) no longer carries the "
                    "study's tag in its config.json (edited by hand); put it back, or move the "
                    f"run out of {runs_root()} and run `mamlpp study resume {study.id} "
                    "--rerun-deleted`.")
            out.append(MemberRun(member, None, {}))
            continue
        chosen = next((r for r in runs if r.run_id == linked), None)
        chosen_status = chosen.read_status() if chosen else None
        if chosen is None or (len(runs) > 1 and chosen_status.get("state") != "finished"):
            chosen, statuses = _pick(runs)
            chosen_status = statuses[0]
        if strict:
            for run in runs:
                check_member_config(study, member, run)
        if link:
            study.link(member, chosen)
        out.append(MemberRun(member, chosen, chosen_status,
                             duplicates=[r.run_id for r in runs if r != chosen]))
    return out


def member_run_for(study: Study, member: Member) -> RunDir:
    """The member's run, created (tagged, linked) if it has none: the one place the runner
    makes member runs. Under members.lock, so no two processes make two runs for it."""
    with members_lock(study):
        for run, tag in tagged_runs(study.id):
            if (tag.get("variant"), tag.get("seed")) == (member.variant, member.seed):
                check_member_config(study, member, run)
                study.link(member, run)
                return run
        linked = study.linked_run(member)
        if linked is not None:  # its run was deleted (or lost its tag) since it was linked
            raise UserError(f"Run {linked} ({member.label} of study {study.id}) is gone from "
                            f"the runs folder; `mamlpp study resume {study.id} --rerun-deleted` "
                            "starts that member afresh.")
        run = create_run({**member.config, "study": study.tag(member)},
                         run_name(study.id, member.variant, member.seed))
        study.link(member, run)
        return run


def create_tagged_run(study_id: str, variant: str, config: Config,
                      name: str | None = None) -> RunDir:
    """What `mamlpp run --study ID --variant V` makes: a run carrying the member's tag.

    With the study in this root, the variant and seed must be a member, the config must be
    the one the study asked for, and the member must not have a run yet; elsewhere (a cluster
    with its own runs folder) the run is just tagged, for `mamlpp study collect` to check."""
    _validate_id(study_id)
    seed = config.train.seed
    tag = {"id": study_id, "variant": variant, "seed": seed}
    path = studies_root() / study_id
    if not (path / STUDY_FILE).is_file():
        return create_run({**config.to_dict(), "study": tag},
                          name or run_name(study_id, variant, seed))
    study = load_study(path)
    member = study.member(variant, seed)
    if member is None:
        variants = ", ".join(v["name"] for v in study.variants)
        raise UserError(f"Study {study_id} has no member {variant!r} with seed {seed} "
                        f"(variants: {variants}; seeds: {', '.join(map(str, study.seeds))}).")
    if config.digest() != member.digest:
        raise UserError(f"This config is not the one study {study_id} asked for {member.label}: "
                        f"{_first_difference(config.to_dict(), member.config)}; use the command "
                        f"`mamlpp study show {study_id} --commands` prints.")
    with members_lock(study):
        for run, tag_ in tagged_runs(study_id):
            if (tag_.get("variant"), tag_.get("seed")) == (variant, seed):
                raise UserError(f"Member {member.label} of study {study_id} already has run "
                                f"{run.run_id}; continue it with `mamlpp resume {run.run_id}`.")
        run = create_run({**config.to_dict(), "study": tag},
                         name or run_name(study_id, variant, seed))
        study.link(member, run)
    return run
