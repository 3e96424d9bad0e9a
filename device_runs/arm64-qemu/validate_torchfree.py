"""``edgekit validate`` minus its one torch import: the device validation of a bundle with the
tokenizer loaded by ``tokenizers`` directly.

    python device_runs/arm64-qemu/validate_torchfree.py BUNDLE REPORT_DIR

Why: on this branch ``edgekit validate`` imports torch through ``edgekit.checkpoint.load_tokenizer``
(validate.py ``validate_bundle``), and the arm64 side has no torch (the torch-free device side is
another issue's work). Everything else is edgekit's own code: ``bundle.verify`` (hashes),
``validate.validate`` (accuracy on the recipe's eval slice against the build-time fp32 baseline,
latency in a clean subprocess, size, memory; latency ``unverified`` with the host's reason) and
``report.write_report``. Exit 0 pass/unverified, 1 when a gate failed.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(bundle: str, report_dir: str) -> int:
    from tokenizers import Tokenizer

    from edgekit.bundle import verify
    from edgekit.data import load_tokens
    from edgekit.recipes import load_recipe
    from edgekit.report import write_report
    from edgekit.validate import validate

    b = Path(bundle)
    manifest = verify(b)
    baseline = json.loads((b / "report.json").read_text())["baseline"]
    recipe = load_recipe(str(b / "recipe.toml"), stages=False)
    domain = getattr(getattr(recipe, "data", None), "domain", None)
    tokens = load_tokens(f"{domain}/eval" if domain else "eval", Tokenizer.from_file(str(b / "tokenizer.json")),
                         recipe.validate.eval_max_tokens or None)
    r = validate(b, recipe, baseline, tokens)
    r["bundle"] = {"path": str(b), "model_name": manifest["model_name"], "built_for": manifest["target"],
                   "edgekit_version": manifest["edgekit_version"]}
    r["validated_by"] = "device_runs/arm64-qemu/validate_torchfree.py (edgekit validate imports torch on this branch)"
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, r)
    print(json.dumps({k: {"value": g["value"], "status": g["status"], **({"reason": g["reason"]} if g.get("reason")
                                                                          else {})}
                      for k, g in r["gates"].items()}, indent=1))
    print(f"status {r['status']}; accuracy {r['compressed']['accuracy']:.4f} (fp32 {baseline['accuracy']:.4f}); "
          f"host {r['host']['cpu_model']} ({r['host']['arch']}), emulated: {r['host'].get('emulated')}")
    return 1 if r["status"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
