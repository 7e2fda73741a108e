"""Typed run configuration: a preset TOML plus `section.key=value` overrides.

Every key of DESIGN.md is a dataclass field here; anything else is an error. Validation happens in
one place (`validate`) so the CLI, the engine and the tests agree on what a legal run is, and every
error is one sentence that names the offending key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError


class ConfigError(UserError):
    """A config problem a user can fix; the message is one sentence naming the key."""


DATASETS = ("omniglot", "miniimagenet", "quickstart")
CHANNELS_LAST = ("auto", "never", "first_order", "always")  # steps run channels-last
PRECISIONS = ("auto", "float32", "tf32", "bf16")
FUSED_KERNELS = ("auto", "on", "off")  # engine/fused_cpu.py's compiled CPU kernels
FFT_CONV = ("auto", "on", "off")  # engine/fft_conv.py's convolutions in NCHW passes
# reference: engine/reference.py, the plain definition the fast paths are tested against
IMPLS = ("auto", "loop", "vmap", "reference")
# (channels, height/width) of the images each dataset feeds the network.
IMAGE_SHAPES = {"omniglot": (1, 28), "quickstart": (1, 28), "miniimagenet": (3, 84)}
# Any other data.dataset names a dataset imported with `mamlpp data import folder`; its image
# shape is in its cache's manifest (read when first needed), and the network takes it.
IMPORTED_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass
class DataConfig:
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 1


@dataclass
class ModelConfig:
    filters: int = 64
    stages: int = 4


@dataclass
class TrainConfig:
    epochs: int = 100
    iters_per_epoch: int = 500
    meta_batch: int = 8
    meta_lr: float = 1e-3
    min_meta_lr: float = 1e-5
    inner_steps: int = 5
    eval_inner_steps: int = 5
    inner_lr: float = 0.1
    grad_clip: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0
    impl: str = "auto"
    chunk_size: int = 0
    task_threads: int = 0
    task_group: int = 0
    channels_last: str = "auto"
    precision: str = "auto"
    fused_kernels: str = "auto"
    fft_conv: str = "auto"


@dataclass
class MamlPPConfig:
    msl: bool = True
    msl_epochs: int = 10
    second_order: bool = True
    first_order_epochs: int = 50
    bn_per_step_stats: bool = True
    bn_per_step_affine: bool = True
    bn_eval_stats: str = "batch"
    lslr: bool = True
    cosine: bool = True


@dataclass
class EvalConfig:
    val_tasks: int = 600
    test_tasks: int = 600
    ensemble_top_k: int = 3


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    maml_pp: MamlPPConfig = field(default_factory=MamlPPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of everything that changes what the engine computes (not name/description)."""
        d = self.to_dict()
        d.pop("name")
        d.pop("description")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the network's input: fixed for the built-in datasets; for an imported
        one, what `set_image_shape` was told (an export knows it) or its cache's manifest."""
        if self.data.dataset in IMAGE_SHAPES:
            c, s = IMAGE_SHAPES[self.data.dataset]
            return (c, s, s)
        known = self.__dict__.get("_image_shape")
        if known is None:
            from engine.data.cache import read_manifest

            manifest = read_manifest(self.data.dataset)
            if manifest is None:
                raise ConfigError(
                    f"data.dataset = {self.data.dataset!r} is not in the data cache; import it "
                    f"with `mamlpp data import folder PATH --name {self.data.dataset}`.")
            known = tuple(int(v) for v in manifest["image_shape"])
            check_image_shape(self, known)
            self.__dict__["_image_shape"] = known
        return known

    def set_image_shape(self, shape: tuple[int, int, int]) -> Config:
        """Fix the input shape of an imported dataset's network (no cache lookup); checked
        against model.stages."""
        shape = tuple(int(v) for v in shape)
        if self.data.dataset not in IMAGE_SHAPES:
            check_image_shape(self, shape)
            self.__dict__["_image_shape"] = shape
        return self


_SECTION_CLASSES = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "maml_pp": MamlPPConfig,
    "eval": EvalConfig,
}
_TOP_LEVEL = ("name", "description")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default; ints are accepted for floats."""
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r}).")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number (got {value!r}).")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {value!r}).")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string (got {value!r}).")
    return value


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts, rejecting unknown keys and wrong types."""
    cfg = Config()
    for key, value in raw.items():
        if key in _TOP_LEVEL:
            setattr(cfg, key, _coerce(key, value, ""))
        elif key in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table of keys, not {value!r}.")
            section = getattr(cfg, key)
            names = {f.name for f in dataclasses.fields(section)}
            for sub, subvalue in value.items():
                if sub not in names:
                    raise ConfigError(
                        f"Unknown config key {key}.{sub}; known keys in [{key}]: "
                        f"{', '.join(sorted(names))}."
                    )
                setattr(section, sub, _coerce(f"{key}.{sub}", subvalue, getattr(section, sub)))
        else:
            known = ", ".join(list(_TOP_LEVEL) + [f"[{s}]" for s in _SECTION_CLASSES])
            raise ConfigError(f"Unknown config key {key!r}; known: {known}.")
    validate(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    """A TOML value (`5`, `1e-3`, `true`, `"loop"`), or the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw config dict (returns a new dict)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value.")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        value = _parse_value(text.strip())
        if len(parts) == 1 and parts[0] in _TOP_LEVEL:
            out[parts[0]] = value
        elif len(parts) == 2 and parts[0] in _SECTION_CLASSES:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(
                f"Unknown config key {path.strip()!r}; use section.key with a section among "
                f"{', '.join(_SECTION_CLASSES)}."
            )
    return out


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid TOML: {e}.") from None
    except OSError as e:
        raise ConfigError(f"Config file {path} cannot be read: {e.strerror}.") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _at_least(key: str, value: float, low: float) -> None:
    _check(value >= low, f"{key} must be at least {low} (got {value}).")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key} must be one of {', '.join(choices)} (got {value!r}).")


def check_image_shape(cfg: Config, shape: tuple[int, ...]) -> None:
    """The network must fit the images: each of model.stages halves them (the one mismatch
    between a preset's network and a dataset's images; channels and size are taken from the
    dataset, so any preset trains on any dataset whose images are large enough)."""
    size = int(shape[-1])
    stages = cfg.model.stages
    _check(
        size >> stages >= 1,
        f"model.stages must be at most {size.bit_length() - 1} for the {size}x{size} images of "
        f"{cfg.data.dataset} (got {stages}); use --set model.stages={size.bit_length() - 1}"
        + (", or import the images at --size 84 or more" if cfg.data.dataset not in IMAGE_SHAPES
           else "") + ".",
    )


def validate(cfg: Config) -> None:
    """Reject impossible values with one sentence naming the key."""
    d, m, t, p, e = cfg.data, cfg.model, cfg.train, cfg.maml_pp, cfg.eval
    _check(d.dataset in DATASETS or bool(IMPORTED_NAME.match(d.dataset)),
           f"data.dataset must be one of {', '.join(DATASETS)} or the name of a dataset "
           f"imported with `mamlpp data import folder PATH --name NAME` (got {d.dataset!r}).")
    _at_least("data.ways", d.ways, 2)
    _at_least("data.shots", d.shots, 1)
    _at_least("data.queries", d.queries, 1)
    _at_least("model.filters", m.filters, 1)
    _at_least("model.stages", m.stages, 1)
    if d.dataset in IMAGE_SHAPES:  # an imported dataset's shape is checked when it is read
        check_image_shape(cfg, (IMAGE_SHAPES[d.dataset][1],))
    _at_least("train.epochs", t.epochs, 1)
    _at_least("train.iters_per_epoch", t.iters_per_epoch, 1)
    _at_least("train.meta_batch", t.meta_batch, 1)
    _check(t.meta_lr > 0, f"train.meta_lr must be positive (got {t.meta_lr}).")
    _at_least("train.min_meta_lr", t.min_meta_lr, 0)
    _check(
        t.min_meta_lr <= t.meta_lr,
        f"train.min_meta_lr must not exceed train.meta_lr ({t.min_meta_lr} > {t.meta_lr}).",
    )
    _at_least("train.inner_steps", t.inner_steps, 1)
    _at_least("train.eval_inner_steps", t.eval_inner_steps, 1)
    _check(t.inner_lr > 0, f"train.inner_lr must be positive (got {t.inner_lr}).")
    _at_least("train.grad_clip", t.grad_clip, 0)
    _at_least("train.seed", t.seed, 0)
    _at_least("train.checkpoint_every", t.checkpoint_every, 0)
    _choice("train.impl", t.impl, IMPLS)
    _at_least("train.chunk_size", t.chunk_size, 0)
    _at_least("train.task_threads", t.task_threads, 0)
    _at_least("train.task_group", t.task_group, 0)
    _choice("train.channels_last", t.channels_last, CHANNELS_LAST)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.fused_kernels", t.fused_kernels, FUSED_KERNELS)
    _choice("train.fft_conv", t.fft_conv, FFT_CONV)
    _at_least("maml_pp.msl_epochs", p.msl_epochs, 1 if p.msl else 0)
    _at_least("maml_pp.first_order_epochs", p.first_order_epochs, -1)
    _choice("maml_pp.bn_eval_stats", p.bn_eval_stats, ("batch", "running"))
    _at_least("eval.val_tasks", e.val_tasks, 1)
    _at_least("eval.test_tasks", e.test_tasks, 1)
    _at_least("eval.ensemble_top_k", e.ensemble_top_k, 1)


def resolve(preset: str | None = None, config_file: Path | None = None,
            overrides: list[str] | None = None) -> Config:
    """The config a run uses: a preset (default quickstart) or a TOML file, then overrides."""
    from engine.presets import load_preset_raw

    if preset is not None and config_file is not None:
        raise ConfigError("Give either --preset or --config, not both.")
    if config_file is not None:
        raw = load_toml(config_file)
    else:
        raw = load_preset_raw(preset or "quickstart")
    return from_dict(apply_overrides(raw, overrides or []))
