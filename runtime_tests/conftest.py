"""Options and fixtures for checking a bundle on the machine it runs on (no torch needed).

    python -m pytest runtime_tests --bundle DIR [--max-rss-mb N]

Without ``--bundle`` every test is skipped with that reason, so a bare ``pytest runtime_tests`` passes.
"""

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # run from a checkout without installing


def pytest_addoption(parser):
    parser.addoption("--bundle", default=None, help="an `edgekit compress` output directory to check")
    parser.addoption("--max-rss-mb", type=float, default=None,
                     help="peak memory bound; default: the 'N MB free RAM' of the bundle's hardware_recommendation")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bundle"):
        return
    skip = pytest.mark.skip(reason="no bundle given: run `python -m pytest runtime_tests --bundle DIR`")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def bundle(request) -> Path:
    d = Path(request.config.getoption("--bundle"))
    if not d.is_dir():
        pytest.fail(f"--bundle {d} is not a directory; pass an `edgekit compress` output directory")
    return d


@pytest.fixture(scope="session")
def recipe(bundle) -> dict:
    f = bundle / "recipe.toml"
    return tomllib.loads(f.read_text()) if f.exists() else {}


@pytest.fixture(scope="session")
def target(recipe, bundle) -> SimpleNamespace:
    """The bundle's [target] as the attributes edgekit.host.latency_unverified_reason reads."""
    import json

    t = recipe.get("target", {})
    manifest = json.loads((bundle / "manifest.json").read_text())
    return SimpleNamespace(name=t.get("name", manifest.get("target", "?")),
                           threads=int(t.get("threads", manifest.get("threads", 1))),
                           spinning=bool(t.get("spinning", manifest.get("spinning", True))),
                           arch=t.get("arch", "any"), ops=t.get("ops", "full"),
                           hardware_recommendation=manifest.get("hardware_recommendation", ""))


@pytest.fixture(scope="session")
def max_rss_mb(request, target) -> float:
    given = request.config.getoption("--max-rss-mb")
    if given:
        return given
    m = re.search(r"(\d+)\s*MB free RAM", target.hardware_recommendation)
    if not m:
        pytest.skip("no memory bound: pass --max-rss-mb N (the bundle's hardware_recommendation names none)")
    return float(m.group(1))


@pytest.fixture(scope="session")
def measured(bundle, recipe, target) -> dict:
    """One latency/memory measurement in a clean subprocess (edgekit.latency) with the target's threads."""
    from edgekit.latency import measure

    goals, val = recipe.get("goals", {}), recipe.get("validate", {})
    return measure(bundle, threads=target.threads, spinning=target.spinning,
                   prefill_tokens=int(goals.get("prefill_tokens", 128)),
                   decode_tokens=int(val.get("decode_tokens", 32)), runs=int(val.get("runs", 20)),
                   warmup=int(val.get("warmup", 3)))
