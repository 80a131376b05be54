"""Experiment configuration: typed dataclasses loaded from YAML.

A :class:`Config` is four plain-data sections: ``model`` (:class:`~libra_rcnn.models.config.ModelConfig`),
``data`` (:class:`DataConfig`), ``train`` (:class:`TrainConfig`) and, for the synthetic demo only,
``demo`` (:class:`DemoConfig`); plus ``output_dir``.

YAML files are read with a ``yaml.SafeLoader`` (no Python tags, nothing is executed; ``1e-4`` is a
float as in YAML 1.2). A file may name a
parent with the data key ``_base_: other.yaml`` (a path relative to the file, or a list of them,
merged left to right); its own keys are merged over the parent's, mappings recursively, every other
value replaced. Command-line overrides ``a.b.c=value`` are applied last; ``value`` is parsed as
YAML too (``train.lr_steps=[16,22]``, ``model.backbone_weights=null``).

Validation is strict and names the source: an unknown key, a value of the wrong type or a value
outside a ``Literal`` raises :class:`ConfigError` such as
``configs/x.yaml: model.bfp.refine_typo: unknown key``.

Why plain dataclasses and PyYAML rather than OmegaConf or pydantic: either would replace the type
walk in :mod:`libra_rcnn.checks` (about 100 lines), but neither has ``_base_`` files relative to
the file that names them nor errors that name the file and the key, which would stay ours; the
models would then take that library's objects instead of plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from libra_rcnn.checks import dataclass_from_dict
from libra_rcnn.errors import UserInputError
from libra_rcnn.models.config import ModelConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "TrainConfig",
    "CONFIG_DIR",
    "config_from_dict",
    "apply_overrides",
    "config_to_dict",
    "dataclass_from_dict",
    "dump_config",
    "list_configs",
    "load_config",
    "resolve_config_path",
]

#: The shipped configs (installed with the package); bare names are looked up here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

BASE_KEY = "_base_"


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags, nothing executed) that also reads ``1e-4`` as a float:
    YAML 1.1, which PyYAML follows, wants a dot in the mantissa (``1.0e-4``)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _safe_load(text: str):
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(UserInputError):
    """A config file or override is invalid. The message starts with the file (or ``--set ...``)."""


@dataclass
class DataConfig:
    """Where the data is and how it is loaded. Paths are relative to the working directory.

    ``*_proposals``: precomputed proposals (needed by ``fast_rcnn`` models, as in the paper's
    ablations). ``val_ann``/``val_images`` set to ``null`` disable evaluation during training.
    """

    train_ann: str = "data/coco/annotations/instances_train2017.json"
    train_images: str = "data/coco/train2017"
    val_ann: Optional[str] = "data/coco/annotations/instances_val2017.json"
    val_images: Optional[str] = "data/coco/val2017"
    train_proposals: Optional[str] = None
    val_proposals: Optional[str] = None
    num_workers: int = 2
    flip_prob: float = 0.5
    # batch images of similar aspect ratio together (less padding); mmdetection's default
    aspect_ratio_grouping: bool = True
    # images larger than this (width * height) are treated as bad samples (decompression bombs)
    max_pixels: int = 64_000_000
    # allow annotation file_names that resolve outside the image root (symlinked datasets)
    allow_outside_root: bool = False
    # validate every sample at start-up and stop on the first problem (``train --strict``)
    strict: bool = False
    # leave training images without any (non-crowd) box out, as mmdetection does
    remove_empty: bool = True
    val_batch_size: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")
        if self.val_batch_size <= 0:
            raise ValueError(f"val_batch_size must be > 0, got {self.val_batch_size}")
        if (self.val_ann is None) != (self.val_images is None):
            raise ValueError("val_ann and val_images must both be set or both be null")


@dataclass
class TrainConfig:
    """Optimisation schedule; defaults are the paper's (mmdetection's) 1x COCO settings.

    The learning rate is ``base_lr`` for a total batch of ``base_batch_size`` images and, with
    ``scale_lr``, scales linearly to the real total batch ``batch_size * world_size`` (the paper:
    0.02 for 8 GPUs x 2 images). ``lr_steps`` are epochs after which the rate is multiplied by
    ``gamma``; a linear warm-up from ``warmup_ratio * lr`` to ``lr`` spans ``warmup_iters``.
    """

    epochs: int = 12
    batch_size: int = 2  # images per process
    base_lr: float = 0.02
    base_batch_size: int = 16
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3.0
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    amp: bool = False
    seed: int = 0
    # torch.use_deterministic_algorithms during training (slower on CUDA)
    deterministic: bool = False
    # max L2 norm of all gradients together; null = no clipping
    grad_clip_norm: Optional[float] = None
    checkpoint_period: int = 1  # epochs between epoch_{n}.pth files (latest.pth: every epoch)
    eval_period: int = 1  # epochs between evaluations (when a val set is given)
    max_consecutive_nonfinite: int = 10
    max_iters: Optional[int] = None  # stop after this many iterations in total (tiny runs)
    log_period: int = 20
    tensorboard: bool = True
    # DDP: needed when some parameters get no gradient in a step
    find_unused_parameters: bool = False
    # CPU intra-op threads while training (torch.set_num_threads); null: PyTorch's default.
    # Small models gain little from more threads, and threads fighting for busy cores are slow.
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "base_batch_size", "checkpoint_period", "eval_period",
                    "max_consecutive_nonfinite", "log_period")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 < self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if any(b <= a for a, b in zip(self.lr_steps, self.lr_steps[1:])):
            raise ValueError(f"lr_steps must be strictly increasing, got {self.lr_steps}")
        if any(s <= 0 for s in self.lr_steps):
            raise ValueError(f"lr_steps must be positive epochs, got {self.lr_steps}")
        if self.max_iters is not None and self.max_iters <= 0:
            raise ValueError(f"max_iters must be > 0 or null, got {self.max_iters}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be > 0 or null, got {self.num_threads}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be > 0 or null, got {self.grad_clip_norm}")


@dataclass
class DemoConfig:
    """The synthetic shapes dataset that ``libra-rcnn demo`` generates under ``output_dir``."""

    num_train: int = 200
    num_val: int = 50
    image_size: int = 128
    seed: int = 0
    num_predictions: int = 8  # val images written with drawn predictions
    score_thresh: float = 0.5

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.image_size < 48:  # the smallest the shapes generator draws
            raise ValueError(f"image_size must be >= 48, got {self.image_size}")
        if self.num_predictions < 0:
            raise ValueError(f"num_predictions must be >= 0, got {self.num_predictions}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.score_thresh <= 1.0:
            raise ValueError(f"score_thresh must be in [0, 1], got {self.score_thresh}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    # null: work_dirs/<config file stem>
    output_dir: Optional[str] = None


def config_from_dict(data: dict, *, source: str = "config", check_only: bool = False) -> Config:
    """Validate a plain mapping into a :class:`Config`; errors become ``ConfigError("<source>: ...")``.

    The model section's values are also checked as the model builder checks them, so that a
    value no detector can be built with is reported here, naming the file, rather than later.
    """
    from libra_rcnn.models import check_model_values

    try:
        cfg = dataclass_from_dict(Config, data, check_only=check_only)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if cfg is not None:
        try:
            check_model_values(cfg.model)
        except ValueError as exc:
            raise ConfigError(f"{source}: model.{exc}") from None
    return cfg


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """``data`` (a plain config mapping) with ``"a.b.c=value"`` overrides merged over it; each
    override's keys and value types are checked (:class:`ConfigError` naming the override)."""
    for override in overrides:
        patch = parse_override(override)
        config_from_dict(patch, source=f"--set {override}", check_only=True)
        data = _merge(data, patch)
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict:
    """A dataclass config as plain YAML/JSON-safe containers (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: Union[str, Path]) -> Path:
    """Write ``cfg`` as YAML (loadable again with :func:`load_config`). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# YAML loading with _base_ inheritance and overrides


def list_configs() -> list[str]:
    """Names of the shipped configs (relative to :data:`CONFIG_DIR`, without ``.yaml``)."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
                  for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config_path(path_or_name: Union[str, Path]) -> Path:
    """A config file path, or a shipped config's name (``libra_faster_rcnn_r50_fpn_1x_coco``,
    ``ablation/table2_libra``, with or without ``.yaml``)."""
    given = Path(path_or_name)
    candidates = [given]
    if not given.is_absolute():
        candidates += [CONFIG_DIR / given, CONFIG_DIR / f"{given}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{path_or_name}: no such config file (and no shipped config of that name; "
                      f"see `libra-rcnn configs`)")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as exc:
        # e.g. a !!python/object tag: safe_load refuses to construct it
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not a valid YAML config{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level, "
                          f"got {type(data).__name__}")
    return data


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merged recursively, anything else replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_merged(path: Path, chain: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{path}: _base_ inheritance cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY}: expected a file name or a list of them")
    # validate this file's own keys here so an error names the file that holds the bad key
    config_from_dict(data, source=str(path), check_only=True)
    merged: dict = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY}: no such file {base_path}")
        merged = _merge(merged, _load_merged(base_path, (*chain, resolved)))
    return _merge(merged, data)


def parse_override(override: str) -> dict:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": value}}}`` with ``value`` parsed as YAML (safely)."""
    source = f"--set {override}"
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source}: expected KEY=VALUE with a dotted KEY such as train.epochs=24")
    try:
        value = _safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: cannot parse the value: {str(exc).splitlines()[0]}") from None
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(path_or_name: Union[str, Path], overrides: Iterable[str] = ()) -> Config:
    """Load and validate a YAML config (with ``_base_`` inheritance), then apply ``overrides``
    (``"a.b.c=value"`` strings). ``output_dir`` left null becomes ``work_dirs/<file stem>``.

    Raises :class:`ConfigError` naming the file (or the ``--set`` override) and the key.
    """
    path = resolve_config_path(path_or_name)
    data = apply_overrides(_load_merged(path, ()), overrides)
    cfg = config_from_dict(data, source=str(path))
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("work_dirs") / path.stem)
    return cfg
