"""The accuracy gate of a bundle, torch-free: next-token accuracy of the bundle on onnxruntime over
the recipe's slice of the eval split, against the build-time fp32 baseline in its report.json.

    python device_runs/arm64-qemu/accuracy.py BUNDLE

Uses only edgekit's device-side modules (``edgekit.data``, ``edgekit.validate.score`` ->
``edgekit.evaluate`` + ``edgekit.runtime``) and ``tokenizers``: run.sh calls it because
``edgekit validate`` still imports torch (through ``edgekit.checkpoint.load_tokenizer``) on this
branch, and torch is not installed on the arm64 side. Prints one JSON line; exit 1 when the drop
is over the recipe's ``accuracy_drop``.
"""

import json
import sys
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(bundle: str) -> int:
    from tokenizers import Tokenizer

    from edgekit.bundle import verify
    from edgekit.data import load_tokens
    from edgekit.validate import score

    b = Path(bundle)
    verify(b)
    recipe = tomllib.loads((b / "recipe.toml").read_text())
    v, goals = recipe.get("validate", {}), recipe.get("goals", {})
    tokens = load_tokens("eval", Tokenizer.from_file(str(b / "tokenizer.json")), v.get("eval_max_tokens") or None)
    acc = score(b, tokens, int(v.get("seq_len", 512)), threads=int(recipe["target"].get("threads", 1)))
    base = json.loads((b / "report.json").read_text())["baseline"]["accuracy"]
    built = json.loads((b / "report.json").read_text())["compressed"]["accuracy"]
    drop, limit = base - acc["accuracy"], goals.get("accuracy_drop", 0.008)
    print(json.dumps({"accuracy": acc["accuracy"], "tokens": acc["tokens"], "fp32_baseline": base,
                      "accuracy_at_build_x86_64": built, "drop": drop, "limit": limit,
                      "status": "pass" if drop <= limit else "fail"}))
    return 0 if drop <= limit else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
