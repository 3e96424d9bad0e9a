"""Domain-targeted compression: which text each stage reads, and the drop on the other domains.

What: ``plan_data(model_dir, recipe, calib, eval_data, recover)`` resolves the pipeline's text
sources. A ``--calib`` that names a shipped domain (``python``, ``c``, ``prose``; see
``edgekit.data``), or, without ``--calib``, the recipe's ``[data] domain``, makes that domain the
target: importance statistics and int8 calibration read its ``calib`` split, distillation its
``recover`` split (or its whole ``train`` text, per the recipe's ``[data] recover``), the accuracy
gate its ``eval`` split (explicit ``--eval``/``--recover`` files still win) and ``dev`` is named for
candidate selection. The other domains the model was trained on
(``training.json`` "domains") are the out-of-domain set. A ``--calib`` file keeps the plain behaviour.

``ood_report(...)`` scores the fp32 model (torch, cached per model and text) and the bundle
(onnxruntime) on each out-of-domain eval split and returns the drops in points and relative to
fp32: reported, never gated — a model deployed for one domain may give up the others.

Invariants: the gate's eval text is never used for calibration, distillation or selection; the
out-of-domain numbers use the same window length as the gate.
Failure modes: an unknown domain in a recipe raises ``EdgekitError`` naming the shipped ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .data import DomainData, is_domain, load_tokens, model_domains


@dataclass(frozen=True)
class DataPlan:
    calib: str
    eval: str
    recover: str | None               # None: the pipeline's default (v3-nano's sample, else calib)
    dev: str | None = None
    domain: str = ""
    out_of_domain: tuple[str, ...] = field(default=())


def plan_data(model_dir: Path, recipe, calib: str | None, eval_data: str | None, recover: str | None) -> DataPlan:
    domain = calib if is_domain(calib) else (recipe.data.domain if calib is None else "")
    if not domain:
        return DataPlan(calib or "calib", eval_data or "eval", recover)
    dd = DomainData.of(domain, recipe.data.recover if recover is None else "recover")   # --recover FILE wins
    ood = tuple(d for d in model_domains(model_dir) if d != domain)
    return DataPlan(dd.calib, eval_data or dd.eval, recover or dd.recover, dd.dev, domain, ood)


def ood_report(src: Path, bundle_model: Path, tok, plan: DataPlan, recipe, cache, gate_report: dict,
               fp32_eval=None) -> dict:
    """{"target": domain, "eval": source, "gated": {...}, "out_of_domain": {domain: {...}}}.
    ``fp32_eval(tokens) -> EvalResult`` scores the fp32 model (default: ``evaluate(load(src))``)."""
    import hashlib

    import numpy as np

    from .checkpoint import load
    from .evaluate import evaluate
    from .stagecache import dir_digest
    from .validate import score

    seq = recipe.validate.seq_len
    g = gate_report["gates"]
    out = {"target": plan.domain, "eval": plan.eval, "calib": plan.calib, "recover": plan.recover, "dev": plan.dev,
           "gated": {"drop_points": g["accuracy_drop"]["value"],
                     "drop_relative": g.get("accuracy_drop_relative", {}).get("value")},
           "out_of_domain": {}}
    for d in plan.out_of_domain:
        tokens = load_tokens(f"{d}/eval", tok, recipe.data.ood_max_tokens or None)

        def fp32(tmp: Path, tokens=tokens):
            res = fp32_eval(tokens) if fp32_eval else evaluate(load(src), tokens, seq_len=seq, progress=False)
            (tmp / "meta.json").write_text(json.dumps(res.to_dict()))

        key = [dir_digest(src), hashlib.sha256(np.ascontiguousarray(tokens, np.int64)).hexdigest(), seq]
        base = json.loads((cache.get("baseline-ood", key, fp32) / "meta.json").read_text())
        got = score(bundle_model, tokens, seq)
        drop = base["accuracy"] - got["accuracy"]
        out["out_of_domain"][d] = {"fp32_accuracy": base["accuracy"], "accuracy": got["accuracy"], "drop_points": drop,
                                   "drop_relative": drop / base["accuracy"] if base["accuracy"] else None,
                                   "tokens": got["tokens"]}
    return out
