"""Recipes: one TOML file per deployment target, mapped 1:1 onto validated dataclasses.

What: ``load_recipe(name_or_path)`` reads ``export_recipes/<name>.toml`` (or any TOML path) into a
``Recipe``: ``[target]`` (the hardware and why), ``[goals]`` (the gates, as data), ``[validate]``
(how to measure), ``[data]`` (the target domain's shipped text) and one table per pipeline stage
(``[prune]``, ``[export]``, ``[quantize]``; the
SmoothQuant scaling is part of ``[quantize]``: ``smooth``, ``alpha``), each the config dataclass of
the module that does that stage, and ``[build]`` (``device``, ``stream``: where the build runs).
``recipe_to_toml(recipe)`` writes the recipe as applied, for the bundle.

Invariants: every key maps to a dataclass field; unknown keys and invalid values are rejected
with one line that names the valid choices (``EdgekitError``, exit 2 from the CLI).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import EdgekitError

OPS = ("full", "mobile", "web")


def recipes_dir() -> Path:
    """``export_recipes/`` at the repo root; a copy ships inside the package for installed use."""
    repo = Path(__file__).resolve().parent.parent / "export_recipes"
    return repo if repo.is_dir() else Path(__file__).parent / "data" / "export_recipes"


@dataclass
class Target:
    """The device class a bundle is built for; ``description`` says the hardware reason."""
    name: str
    description: str = ""
    threads: int = 4                  # onnxruntime intra-op threads on the device
    spinning: bool = True             # intra-op thread spinning (faster alone, worse when sharing cores)
    arch: str = "any"                 # "any", "x86_64" or "arm64": the host must match to verify latency
    ops: str = "full"                 # operator set: full ORT CPU (com.microsoft), mobile, web
    format: str = "onnx"              # "onnx" or "ort" (onnxruntime mobile's flatbuffer format)
    hardware_recommendation: str = ""

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"threads={self.threads}: use >= 1")
        if self.ops not in OPS:
            raise ValueError(f"ops={self.ops!r}: use one of {OPS}")
        if self.format not in ("onnx", "ort"):
            raise ValueError(f"format={self.format!r}: use 'onnx' or 'ort'")
        if self.arch not in ("any", "x86_64", "arm64"):
            raise ValueError(f"arch={self.arch!r}: use 'any', 'x86_64' or 'arm64'")


@dataclass
class Goals:
    """Gates. accuracy_drop is next-token accuracy points as a fraction (0.008 = 0.8 points);
    accuracy_drop_relative is the same drop divided by the fp32 accuracy (0.008 = 0.8%). Both hold."""
    accuracy_drop: float = 0.008
    accuracy_drop_relative: float = 0.008
    latency_prefill_p95_ms: float = 180.0
    latency_decode_p95_ms: float = 50.0
    size_ratio: float = 0.25          # hard limit: bundle bytes / fp32 ONNX bytes
    size_ratio_goal: float = 0.125    # reported beside the gate (the 1/8 headline)
    prefill_tokens: int = 128

    def __post_init__(self):
        if not 0 <= self.accuracy_drop < 1:
            raise ValueError(f"accuracy_drop={self.accuracy_drop}: a fraction, e.g. 0.008 for 0.8 points")
        if not 0 <= self.accuracy_drop_relative < 1:
            raise ValueError(f"accuracy_drop_relative={self.accuracy_drop_relative}: a fraction of the fp32 "
                             "accuracy, e.g. 0.008 for 0.8%")
        for k in ("latency_prefill_p95_ms", "latency_decode_p95_ms", "size_ratio", "prefill_tokens"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k}={getattr(self, k)}: must be > 0")


@dataclass
class Validate:
    """How validation measures: repetitions after warm-up, decode length, eval data size."""
    warmup: int = 3
    runs: int = 20
    decode_tokens: int = 32
    eval_max_tokens: int = 0          # 0: the whole eval split
    seq_len: int = 512

    def __post_init__(self):
        if self.runs < 2 or self.warmup < 0 or self.decode_tokens < 2:
            raise ValueError("validate: need runs >= 2, warmup >= 0, decode_tokens >= 2")


@dataclass
class Data:
    """Which shipped text the pipeline reads when ``--calib`` names no file: ``domain`` (a directory of
    ``edgekit/data/domains``) supplies calibration, distillation, dev and the gated eval text; the
    other domains the model was trained on are scored too (reported, not gated), on at most
    ``ood_max_tokens`` tokens each. "" keeps the plain shipped splits."""
    domain: str = ""
    ood_max_tokens: int = 32768

    def __post_init__(self):
        from .data import domain_names

        if self.domain and self.domain not in domain_names():
            raise ValueError(f"domain={self.domain!r}: use one of {', '.join(domain_names())} (or \"\" for none)")
        if self.ood_max_tokens < 0:
            raise ValueError(f"ood_max_tokens={self.ood_max_tokens}: use >= 0 (0: whole eval split)")


def drop_budget(goals: Goals, baseline_accuracy: float) -> float:
    """The largest accuracy drop (points, as a fraction) that passes both accuracy gates."""
    return min(goals.accuracy_drop, goals.accuracy_drop_relative * baseline_accuracy)


@dataclass
class Build:
    """Where and how the build runs (not the target): ``device`` for torch work (calibration,
    importance, distillation, torch evaluation; "auto" = CUDA when present), ``stream``: run the
    pipeline one layer at a time ("auto": when the fp32 model would take over a quarter of the
    memory available now; true / false)."""
    device: str = "auto"
    stream: str = "auto"

    def __post_init__(self):
        from .device import DEVICES

        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: use one of {DEVICES}")
        self.stream = {True: "true", False: "false"}.get(self.stream, self.stream)
        if self.stream not in ("auto", "true", "false"):
            raise ValueError(f"stream={self.stream!r}: use \"auto\", true or false")


def _stage_classes() -> dict[str, type]:
    from .export import ExportConfig
    from .prune import PruneConfig
    from .quantize import QuantConfig

    return {"prune": PruneConfig, "export": ExportConfig, "quantize": QuantConfig}


@dataclass
class Recipe:
    target: Target
    goals: Goals = field(default_factory=Goals)
    validate: Validate = field(default_factory=Validate)
    data: Data = field(default_factory=Data)
    prune: Any = None
    export: Any = None
    quantize: Any = None
    source: str = ""
    build: Build = field(default_factory=Build)


def build(cls: type, table: dict, where: str):
    """Construct dataclass ``cls`` from a TOML table; one-line errors naming the fix."""
    if not isinstance(table, dict):
        raise EdgekitError(f"{where} must be a table ([{where}]), got {type(table).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise EdgekitError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(names)}")
    try:
        return cls(**table)
    except (TypeError, ValueError) as e:
        raise EdgekitError(f"bad value in [{where}]: {e}") from None


STAGES = ("prune", "export", "quantize")


def parse_recipe(data: dict, source: str = "", stages: bool = True) -> Recipe:
    """``stages=False`` validates only target/goals/validate (device-side: no torch needed)."""
    tables = {"target": Target, "goals": Goals, "validate": Validate, "data": Data, "build": Build}
    unknown = sorted(set(data) - set(tables) - set(STAGES))
    if unknown:
        raise EdgekitError(f"{source}: unknown table [{unknown[0]}]; valid tables: "
                           f"{', '.join([*tables, *STAGES])}")
    if "target" not in data or "name" not in data["target"]:
        raise EdgekitError(f"{source}: missing [target] name; every recipe names its target")
    if stages:
        tables.update(_stage_classes())
    built = {k: build(cls, data.get(k, {}), k) for k, cls in tables.items()}
    return Recipe(**built, source=source)


def target_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def load_recipe(name_or_path: str, stages: bool = True) -> Recipe:
    """A target name (``cpu4``) or a path to a user recipe TOML."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = recipes_dir() / f"{name_or_path}.toml"
        if not p.exists():
            raise EdgekitError(f"unknown target {name_or_path!r}; choose one of {', '.join(target_names())} "
                               "or pass a recipe .toml path")
    elif not p.exists():
        raise EdgekitError(f"recipe {p} not found; pass an existing .toml path or a target name")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgekitError(f"{p} is not valid TOML ({e}); fix the syntax") from None
    return parse_recipe(data, str(p), stages)


def recipe_dict(recipe: Recipe) -> dict:
    out = {}
    for k in ("target", "goals", "validate", "data", "build", *STAGES):
        v = getattr(recipe, k)
        if v is not None:
            out[k] = {a: b for a, b in dataclasses.asdict(v).items() if b is not None}
    return out


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    return tomli_w.dumps(recipe_dict(recipe))


def with_overrides(recipe: Recipe, **tables: dict) -> Recipe:
    """A copy with some stage fields replaced, e.g. ``with_overrides(r, prune={"experts": 0.5})``."""
    new = dataclasses.replace(recipe)
    for name, changes in tables.items():
        cur = getattr(recipe, name)
        setattr(new, name, build(type(cur), {**dataclasses.asdict(cur), **changes}, name))
    return new
