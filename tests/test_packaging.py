"""A wheel of the project runs: it carries conf/ and launchers/ inside the package (pyproject.toml), where
simpo_exp.rundir.PROJECT_DIR finds them. Installed from a wheel (pip install git+..., a built wheel), the package
alone had no config groups: Hydra stopped with "Primary config directory not found"."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_list_names_every_package_and_the_data_covers_every_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "simpo_exp").rglob("__init__.py")}
    data = {  # every folder of conf/ and launchers/, as the package it is in the wheel
        ".".join([package, *d.relative_to(ROOT / folder).parts])
        for package, folder in tool["package-dir"].items()
        for d in [ROOT / folder, *(ROOT / folder).rglob("*")]
        if d.is_dir() and d.name != "__pycache__"
    }
    assert set(tool["packages"]) == code | data
    patterns = tool["package-data"]["*"]
    for folder in tool["package-dir"].values():
        files = {p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        left_out = {p for p in files if not any(p.match(pattern) for pattern in patterns)}
        assert left_out == set(), f"{folder}: files the wheel would leave out"


def _setuptools_builds() -> bool:
    """Whether the installed setuptools meets pyproject's build requirement (setuptools>=68)."""
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 68
    except Exception:
        return False


def test_a_wheel_composes_and_finds_the_launcher_configs_away_from_the_repository(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and an egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("simpo_exp", "conf", "launchers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # with the setuptools at hand where it is one the build accepts, else from the package index as pip would
    isolation = ["--no-build-isolation"] if _setuptools_builds() else []
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("simpo_exp-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "simpo_exp" / "conf" / "config.yaml").is_file()
    shipped = {p.relative_to(site / "simpo_exp").as_posix() for p in (site / "simpo_exp").rglob("*") if p.is_file()}
    tracked = {
        p.relative_to(ROOT).as_posix()
        for folder in ("conf", "launchers")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert tracked <= shipped, sorted(tracked - shipped)  # every preset and launcher file, in its folder

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = os.environ | {"PYTHONPATH": str(site)}  # before the editable install's finder

    def run(*args):
        done = subprocess.run([sys.executable, *args], cwd=away, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = run(
        "-c",
        "import simpo_exp.engine as e, simpo_exp.rundir as r;"
        "print(r.PROJECT_DIR); print(e.deepspeed_config_path('launchers/ds_zero3.json'))",
    ).split()
    assert where == [str(site / "simpo_exp"), str(site / "simpo_exp" / "launchers" / "ds_zero3.json")]
    job = run("-m", "simpo_exp", "--cfg", "job", "hardware=zero3", "model=llama3-8b")
    assert "deepspeed_config: launchers/ds_zero3.json" in job and "meta-llama/Meta-Llama-3-8B" in job
    for stage in ("simpo_exp.generate", "simpo_exp.evaluate"):
        run("-m", stage, "--cfg", "job")
