"""Packaging: the wheel (and a non-editable `pip install .`) carries everything the demo needs.

The slow test builds the wheel from a copy of the source tree, installs it into a fresh venv
with the pinned dependencies (torch first, as scripts/setup_env.sh does), and runs `vlm-prune
demo` there from a folder outside the repository, so nothing is imported from the source tree.
It needs the package index for the dependencies (the pip cache makes it ~1.5 min; the venv is
~2 GB and is deleted afterwards).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("vlm_prune", "kernels", "patches", "evals")  # what the package is built from


def _setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    """The source folder setuptools builds `package` from (the longest package-dir prefix)."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[cut:])
    return ROOT / Path(*parts)


def _installed_name(path: Path, config: dict) -> str | None:
    """'vlm_prune/patches/llava.py' for ROOT/patches/llava.py: where a source file lands in the wheel."""
    for package in config["packages"]:
        if path.parent == _folder_of(package, config["package-dir"]):
            return "/".join(package.split(".") + [path.name])
    return None


def test_every_source_package_is_declared_and_the_fixture_is_package_data():
    """pyproject.toml lists its packages by hand (kernels/, patches/, evals/ install under
    vlm_prune.*): every folder with an __init__.py must be one of them, or the wheel lacks it."""
    config = _setuptools_config()
    declared = {_folder_of(p, config["package-dir"]) for p in config["packages"]}
    found = {init.parent for folder in SOURCE_FOLDERS for init in (ROOT / folder).rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found == declared, f"undeclared: {sorted(map(str, found - declared))}, missing: {sorted(map(str, declared - found))}"
    assert "fixture_model/*" in config["package-data"]["vlm_prune"]
    assert not [p for p in (ROOT / "vlm_prune" / "fixture_model").iterdir() if p.is_dir()]  # the glob is flat


def _run(command: list, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path):
    from vlm_prune.demo import METHODS

    config = _setuptools_config()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    offline = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    constraints = ROOT / "constraints.txt"

    # the wheel, from a copy (an in-tree build would write build/ and *.egg-info into the checkout)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*-results"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path / "dist", src], tmp_path, env, 600)
    (wheel,) = (tmp_path / "dist").glob("vlm_prune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    fixture_files = {f"vlm_prune/fixture_model/{p.name}" for p in (ROOT / "vlm_prune" / "fixture_model").iterdir()}
    assert {"vlm_prune/fixture_model/model.safetensors", "vlm_prune/fixture_model/README.md"} <= fixture_files <= names
    sources = {_installed_name(p, config) for folder in SOURCE_FOLDERS for p in (ROOT / folder).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert None not in sources and sources <= names, sorted(sources - names)
    assert not [n for n in names if n.startswith(("tools/", "tests/"))]

    venv = tmp_path / "venv"
    try:
        # a fresh venv, torch first and pinned (scripts/setup_env.sh: never let pip resolve another torch)
        _run([sys.executable, "-m", "venv", venv], tmp_path, env, 300)
        python = venv / "bin" / "python"
        _run([python, "-m", "pip", "install", "--quiet", "-c", constraints, "torch==2.13.0"], tmp_path, env, 1200)
        _run([python, "-m", "pip", "install", "--quiet", "-c", constraints, f"{wheel}[plot]"], tmp_path, env, 1200)

        outside = tmp_path / "elsewhere"  # no vlm_prune/ here: imports come from the venv
        outside.mkdir()
        where = _run([python, "-c", "import vlm_prune, vlm_prune.fixture as f, torch; "
                      "print(vlm_prune.__file__); print(f.DEFAULT_PATH); print(torch.__version__)"],
                     outside, offline, 300).stdout.split()
        site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         outside, env, 60).stdout.strip())
        assert Path(where[0]).is_relative_to(site) and not Path(where[0]).is_relative_to(ROOT), where
        assert Path(where[1]) == site / "vlm_prune" / "fixture_model" and where[2] == "2.13.0+cpu", where

        # the demo from the installed console script, offline
        out = tmp_path / "demo"
        _run([venv / "bin" / "vlm-prune", "demo", "-n", "30", "--budgets", "16", "--timing-rounds", "0", "--out", out],
             outside, offline, 900)
        cells = [line.split("|")[1:3] for line in (out / "demo.md").read_text().splitlines() if line.startswith("| ")]
        rows = {(m.strip(), k.strip()) for m, k in cells} - {("method", "keep")}  # less the header
        assert rows == {("unpruned", "144")} | {(m, "16") for m in METHODS}
        for name in ("demo.json", "accuracy_vs_tokens.png", "accuracy_vs_flops.png"):
            assert (out / name).is_file(), name

        # a non-editable `pip install .` carries the fixture too
        _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", src], outside, env, 600)
        listed = _run([python, "-c", "import vlm_prune.fixture as f; m, p = f.load(); "
                       "print(f.DEFAULT_PATH); print(*sorted(x.name for x in f.DEFAULT_PATH.iterdir()))"],
                      outside, offline, 300).stdout.splitlines()
        assert Path(listed[-2]).is_relative_to(site)
        assert set(listed[-1].split()) == {name.rsplit("/", 1)[1] for name in fixture_files}
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~2 GB
