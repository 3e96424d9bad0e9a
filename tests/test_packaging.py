"""Packaging: the wheel's package list covers every subpackage of edgekit/ and maps the top-level
export_recipes/ into the package (CI installs the built wheel and runs the main job from it)."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_packages_cover_every_subpackage_and_the_recipes():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgekit").rglob("__init__.py")}
    listed = set(cfg["packages"])
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert cfg["package-dir"]["edgekit.export_recipes"] == "export_recipes"
    assert "*.toml" in cfg["package-data"]["edgekit.export_recipes"]
    assert sorted((ROOT / "export_recipes").glob("*.toml")), "the recipes stay at the top level"


def test_recipes_dir_prefers_the_packaged_copy(tmp_path, monkeypatch):
    import edgekit.recipes as r

    assert r.recipes_dir() == ROOT / "export_recipes" and "cpu4" in r.target_names()
    pkg = tmp_path / "edgekit"
    (pkg / "export_recipes").mkdir(parents=True)
    (pkg / "export_recipes" / "only.toml").write_text('[target]\nname = "only"\n')
    monkeypatch.setattr(r, "__file__", str(pkg / "recipes.py"))
    assert r.target_names() == ["only"]
