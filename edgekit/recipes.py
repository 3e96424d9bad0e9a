"""Recipes: one TOML file per deployment target, mapped 1:1 onto validated dataclasses.

What: ``load_recipe(name_or_path, stages)`` reads ``export_recipes/<name>.toml`` (or any TOML path)
into a ``Recipe``: ``[target]`` (the hardware and why), ``[goals]`` (the gates and how the accuracy
budget is split between pruning and int8, as data), ``[validate]`` (how to measure), ``[data]``
(the target domain's shipped text), ``[auto]`` (the ``--auto`` candidates, how one is picked, the
dev split it is picked on) and one table per compile stage (``STAGE_TABLES``: ``[prune]``,
``[smooth]``, ``[export]``, ``[quantize]``),
and ``[build]`` (``device``, ``stream``: where and how the build runs, not the target).
``recipe_to_toml(recipe)`` writes the recipe as applied, for the bundle.

Stage configs are registered by the caller, not imported here: ``stages`` maps a stage table to
the config dataclass of the module that runs that stage (``edgekit.pipeline.STAGE_CONFIGS``).
Registered tables become those dataclasses; unregistered ones stay plain dicts. So this module
(and the device side reading a bundle's ``recipe.toml``: ``edgekit validate``, the runtime) never
imports torch or a stage package.

Invariants: every key of a built table maps to a dataclass field; unknown tables or keys and
invalid values are rejected with one line that names the valid choices (``EdgekitError``, exit 2
from the CLI), before any stage runs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import EdgekitError

OPS = ("full", "mobile", "web")
STAGE_TABLES = ("prune", "smooth", "export", "quantize")   # compile stages, in pipeline order
SELECT = ("smallest", "most_accurate")


def recipes_dir() -> Path:
    """``export_recipes/``: inside the package in an installed wheel (pyproject.toml maps the top-level
    directory to ``edgekit.export_recipes``), else at the root of the checkout (editable install)."""
    packaged = Path(__file__).resolve().parent / "export_recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "export_recipes"


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
    # onnxruntime session config entries (``SessionOptions.add_session_config_entry``), e.g.
    # {"session.dynamic_block_base" = "4"}: used wherever the bundle is timed or run
    session_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.session_config, dict):
            raise ValueError(f"session_config={self.session_config!r}: a table of strings, e.g. "
                             '{"session.dynamic_block_base" = "4"}')
        bad = [k for k, v in self.session_config.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"session_config: {bad[0]!r}: keys and values are strings, e.g. "
                             '{"session.dynamic_block_base" = "4"}')
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
    accuracy_drop_relative is the same drop divided by the fp32 accuracy (0.008 = 0.8%). Both hold.
    int8_margin / int8_floor split that budget between pruning and int8 (``int8_budget``)."""
    accuracy_drop: float = 0.008
    accuracy_drop_relative: float = 0.008
    latency_prefill_p95_ms: float = 180.0
    latency_decode_p95_ms: float = 50.0
    size_ratio: float = 0.25          # hard limit: bundle bytes / fp32 ONNX bytes
    size_ratio_goal: float = 0.125    # reported beside the gate (the 1/8 headline)
    prefill_tokens: int = 128
    int8_margin: float = 0.25         # share of accuracy_drop int8 may not plan with (calib text != eval text)
    int8_floor: float = 0.25          # share of accuracy_drop int8 always gets, whatever pruning spent

    def __post_init__(self):
        if not 0 <= self.accuracy_drop < 1:
            raise ValueError(f"accuracy_drop={self.accuracy_drop}: a fraction, e.g. 0.008 for 0.8 points")
        if not 0 <= self.accuracy_drop_relative < 1:
            raise ValueError(f"accuracy_drop_relative={self.accuracy_drop_relative}: a fraction of the fp32 "
                             "accuracy, e.g. 0.008 for 0.8%")
        for k in ("latency_prefill_p95_ms", "latency_decode_p95_ms", "size_ratio", "prefill_tokens"):
            if not getattr(self, k) > 0:  # NaN fails too
                raise ValueError(f"{k}={getattr(self, k)}: must be > 0")
        for k in ("int8_margin", "int8_floor"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k}={getattr(self, k)}: a share of accuracy_drop in [0, 1]")

    def int8_budget(self, baseline_accuracy: float, pruning_cost: float, cap: float) -> float:
        """The accuracy budget int8 planning gets, of the drop both accuracy gates allow at this fp32
        accuracy (``drop_budget``): what pruning (measured ``pruning_cost``) left of
        budget * (1 - int8_margin), never less than budget * int8_floor (int8 is what makes the
        bundle small; reverting layers to fp32 cannot rescue a pruning that already spent the
        budget: the accuracy gate reports that), never more than ``cap`` ([quantize] max_drop)."""
        budget = drop_budget(self, baseline_accuracy)
        left = budget * (1 - self.int8_margin) - pruning_cost
        return round(min(cap, max(budget * self.int8_floor, left)), 5)


@dataclass
class Validate:
    """How validation measures: repetitions after warm-up, decode length, eval data size. ``rounds``:
    the latency worker runs that many times (fresh processes, one after another) and each latency
    gate takes the median over rounds of a round's p95 (edgekit/latency.py says why)."""
    warmup: int = 3
    runs: int = 20
    decode_tokens: int = 32
    eval_max_tokens: int = 0          # 0: the whole eval split
    seq_len: int = 512
    rounds: int = 1

    def __post_init__(self):
        if self.runs < 2 or self.warmup < 0 or self.decode_tokens < 2 or self.rounds < 1:
            raise ValueError("validate: need runs >= 2, warmup >= 0, decode_tokens >= 2, rounds >= 1")


@dataclass
class Data:
    """Which shipped text the pipeline reads when ``--calib`` names no file: ``domain`` (a directory of
    ``edgekit/data/domains``) supplies calibration, distillation, dev and the gated eval text; the
    other domains the model was trained on are scored too (reported, not gated), on at most
    ``ood_max_tokens`` tokens each. "" keeps the plain shipped splits. ``recover``: the domain's split
    distillation reads: "recover" (a 2.5 MB sample of the training text) or "train" (the whole training
    text, where the domain ships it: python; for thousands of GPU steps)."""
    domain: str = ""
    ood_max_tokens: int = 32768
    recover: str = "recover"

    def __post_init__(self):
        from .data import RECOVERY_SPLITS, domain_names, recovery_splits

        if self.domain and self.domain not in domain_names():
            raise ValueError(f"domain={self.domain!r}: use one of {', '.join(domain_names())} (or \"\" for none)")
        if self.recover not in RECOVERY_SPLITS:
            raise ValueError(f"recover={self.recover!r}: use \"recover\" (the shipped sample) or \"train\"")
        if self.domain and self.recover not in recovery_splits(self.domain):
            raise ValueError(f"recover={self.recover!r}: domain {self.domain!r} ships "
                             f"{' and '.join(recovery_splits(self.domain))} only")
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


@dataclass
class Auto:
    """``edgekit compress --auto``: each candidate (stage-table overrides applied over the recipe) is
    built through the same cached stages and scored on the dev split: the target domain's shipped
    ``dev`` split when a domain is targeted ([data] domain / ``--calib DOMAIN``), else the last
    ``dev_tokens`` tokens of the calibration text, which --auto then holds out of calibration,
    pruning and distillation. The eval split stays the gate's alone. Among candidates meeting both
    accuracy gates and the size gate on dev, ``select`` picks the "smallest" bundle or the
    "most_accurate"; when none meets them, the most accurate is built and its gates fail as usual."""
    candidates: dict = field(default_factory=dict)   # name -> {stage table: {field: value}}
    select: str = "smallest"
    dev_tokens: int = 16384

    def __post_init__(self):
        if self.select not in SELECT:
            raise ValueError(f"select={self.select!r}: use one of {SELECT}")
        if self.dev_tokens < 2:
            raise ValueError(f"dev_tokens={self.dev_tokens}: the dev split needs >= 2 tokens (e.g. 16384)")
        if not isinstance(self.candidates, dict):
            raise ValueError("candidates must be a table of name = {stage = {field = value}}")
        for name, over in self.candidates.items():
            if not isinstance(over, dict) or not all(isinstance(v, dict) for v in over.values()):
                raise ValueError(f"candidates.{name} must be a table of stage tables, "
                                 "e.g. {prune = {experts = 0.25}}")
            bad = sorted(set(over) - set(STAGE_TABLES))
            if bad:
                raise ValueError(f"candidates.{name}.{bad[0]} is not a stage table; use {', '.join(STAGE_TABLES)}")


@dataclass
class Recipe:
    target: Target
    goals: Goals = field(default_factory=Goals)
    validate: Validate = field(default_factory=Validate)
    data: Data = field(default_factory=Data)
    auto: Auto = field(default_factory=Auto)
    prune: Any = None                 # stage tables: the registered config dataclass, else the raw table
    smooth: Any = None
    export: Any = None
    quantize: Any = None
    source: str = ""
    build: Build = field(default_factory=Build)


def build(cls: type, table: dict, where: str):
    """Construct dataclass ``cls`` (or ``dict``: the table as is) from a TOML table; one-line
    errors naming the fix."""
    if not isinstance(table, dict):
        raise EdgekitError(f"{where} must be a table ([{where}]), got {type(table).__name__}")
    bad = _non_finite(table)
    if bad:
        raise EdgekitError(f"bad value in [{where}]: {bad[0]}={bad[1]}: use a finite number")
    if cls is dict:
        return dict(table)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise EdgekitError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(names)}")
    try:
        return cls(**table)
    except (TypeError, ValueError) as e:
        raise EdgekitError(f"bad value in [{where}]: {e}") from None


def _non_finite(table: dict, prefix: str = "") -> tuple[str, float] | None:
    """The first NaN/inf value (TOML allows ``nan`` and ``inf``), nested tables included."""
    for k, v in table.items():
        if isinstance(v, float) and not math.isfinite(v):
            return f"{prefix}{k}", v
        if isinstance(v, dict):
            found = _non_finite(v, f"{prefix}{k}.")
            if found:
                return found
    return None


def parse_recipe(data: dict, source: str = "", stages: Mapping[str, type] | None = None) -> Recipe:
    """``stages``: stage table -> config dataclass to build and validate (the compile side passes
    ``edgekit.pipeline.STAGE_CONFIGS``); other stage tables stay raw dicts (the device side)."""
    tables = {"target": Target, "goals": Goals, "validate": Validate, "data": Data, "auto": Auto,
              "build": Build}
    unknown = sorted(set(data) - set(tables) - set(STAGE_TABLES))
    if unknown:
        raise EdgekitError(f"{source}: unknown table [{unknown[0]}]; valid tables: "
                           f"{', '.join([*tables, *STAGE_TABLES])}")
    if "target" not in data or "name" not in data["target"]:
        raise EdgekitError(f"{source}: missing [target] name; every recipe names its target")
    built = {k: build(cls, data.get(k, {}), k) for k, cls in tables.items()}
    for k in STAGE_TABLES:
        cls = (stages or {}).get(k)
        if cls is not None:
            built[k] = build(cls, data.get(k, {}), k)
        elif k in data:
            built[k] = build(dict, data[k], k)
    recipe = Recipe(**built, source=source)
    for name, over in recipe.auto.candidates.items():     # each candidate must build too
        try:
            with_overrides(recipe, **{t: v for t, v in over.items() if t in (stages or {})})
        except EdgekitError as e:
            raise EdgekitError(f"{source}: [auto] candidate {name!r}: {e}") from None
    return recipe


def target_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def load_recipe(name_or_path: str, stages: Mapping[str, type] | None = None) -> Recipe:
    """A target name (``cpu4``) or a path to a user recipe TOML (``stages``: see ``parse_recipe``)."""
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
    for k in ("target", "goals", "validate", "data", "auto", "build", *STAGE_TABLES):
        v = getattr(recipe, k)
        if v is not None:
            d = v if isinstance(v, dict) else dataclasses.asdict(v)
            out[k] = {a: b for a, b in d.items() if b is not None}
    return out


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    return tomli_w.dumps(recipe_dict(recipe))


def with_overrides(recipe: Recipe, **tables: dict) -> Recipe:
    """A copy with some table fields replaced, e.g. ``with_overrides(r, prune={"experts": 0.5})``
    (validated like the recipe file)."""
    new = dataclasses.replace(recipe)
    for name, changes in tables.items():
        cur = getattr(recipe, name)
        if cur is None or isinstance(cur, dict):
            setattr(new, name, build(dict, {**(cur or {}), **changes}, name))
        else:
            setattr(new, name, build(type(cur), {**dataclasses.asdict(cur), **changes}, name))
    return new
