"""The package layout contract of DESIGN.md: folders mapped into ckptd.*, nothing generic installed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_source_package_is_listed_in_pyproject() -> None:
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    st = tool["setuptools"]
    listed = set(st["packages"])
    mapping = st["package-dir"]
    expected = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if any(part in ("static", "__pycache__") for part in rel.parts):
                continue
            expected.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    missing = expected - listed
    assert not missing, f"packages missing from pyproject [tool.setuptools] packages: {sorted(missing)}"


def test_generic_top_level_names_are_not_installed() -> None:
    # `format` and `api` must only exist as ckptd.format / ckptd.api, never as top-level names.
    import sysconfig

    import ckptd.api
    import ckptd.format

    assert ckptd.format.__name__ == "ckptd.format"
    assert ckptd.api.__name__ == "ckptd.api"
    site = Path(sysconfig.get_paths()["purelib"])
    for name in ("api", "format", "training", "converters", "migrations"):
        assert not (site / name).exists(), f"{name} was installed as a top-level package"
        assert not (site / f"{name}.py").exists()


def test_spec_document_ships_with_the_format_package() -> None:
    spec = ROOT / "format" / "SPEC.md"
    text = spec.read_text()
    assert "format_version" in text and "sharding_indexed" in text


def test_migrations_are_package_data_and_the_environment_overrides_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptd
    from ckptd.api.db import ENV_MIGRATIONS_DIR, migrations_dir
    from ckptd.api.errors import CatalogError

    monkeypatch.delenv(ENV_MIGRATIONS_DIR, raising=False)
    shipped = migrations_dir()
    assert shipped == Path(ckptd.__file__).parent / "migrations"  # inside the package, as in a wheel
    assert sorted(p.name for p in (shipped / "versions").glob("*.py")) == sorted(
        p.name for p in (ROOT / "migrations" / "versions").glob("*.py")
    ), "a migration was added or removed: run `make relink`"

    own = tmp_path / "migrations"
    own.mkdir()
    (own / "env.py").write_text("")
    monkeypatch.setenv(ENV_MIGRATIONS_DIR, str(own))
    assert migrations_dir() == own
    monkeypatch.setenv(ENV_MIGRATIONS_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(CatalogError, match=r"holds no Alembic env\.py"):
        migrations_dir()
