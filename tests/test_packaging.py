"""Packaging: every package folder is listed in pyproject.toml, and an installed project coexists
with Hugging Face's `kernels` (both importable in either install order; uninstalling one leaves the
other whole; `lvlm generate ... --interventions vhr` runs from the installed wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders() -> dict[str, Path]:
    """Import name -> folder of every folder with an __init__.py under the project's packages,
    through pyproject's package-dir mapping (lvlm/ -> lvlm_hallu.lvlm)."""
    mapping = {"lvlm_hallu": "lvlm_hallu", **PYPROJECT["tool"]["setuptools"]["package-dir"]}
    found = {}
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            found[".".join([name, *rel.parts])] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = package_folders()
    assert {"lvlm_hallu.lvlm", "lvlm_hallu.lvlm.shapes", "lvlm_hallu.kernels"} <= set(found)
    missing = sorted(set(found) - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert not sorted(listed - set(found)), "listed packages without a folder holding __init__.py"


def test_no_installed_top_level_name_but_lvlm_hallu():
    """The wheel's only top-level import name is lvlm_hallu (nothing another distribution owns)."""
    tops = {name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]}
    assert tops == {"lvlm_hallu"}
    assert all(name.startswith("lvlm_hallu.") for name in PYPROJECT["tool"]["setuptools"]["package-dir"])


# ---------------------------------------------------------------------------------------------
# A scratch venv beside Hugging Face's `kernels` (slow: builds a wheel, needs PyPI for `kernels`)

KERNELS = ["kernels", "tomlkit"]  # HF kernels and the one dependency the project's venv may lack


def _run(cmd: list[str], *, cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _venv(path: Path) -> Path:
    """A venv whose dependencies come from this interpreter's site-packages through a .pth file
    (no torch reinstall); the .pth adds the folder only, so this venv's own installs come first and
    the project's editable install there stays invisible (its finder is not run)."""
    import sysconfig

    _run([sys.executable, "-m", "venv", str(path)], cwd=path.parent)
    py = path / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path.parent)
                .stdout.strip())
    (site / "deps-from-project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def _uninstall(py: Path, dist: str, venv: Path, cwd: Path) -> None:
    """pip uninstall in the scratch venv, after checking that the copy it would remove is the
    scratch venv's (never the project venv's, which the .pth file makes visible)."""
    where = _run([str(py), "-c", f"import importlib.metadata as m; print(m.distribution({dist!r})._path)"], cwd=cwd)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    _run([str(py), "-m", "pip", "uninstall", "-q", "-y", dist], cwd=cwd)


def _check(py: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run([str(py), "-c", code], cwd=cwd, check=False)


IMPORT_HF = "import kernels; assert callable(kernels.get_kernel); print(kernels.__file__)"
IMPORT_OURS = ("import lvlm_hallu.kernels as k, lvlm_hallu.lvlm, lvlm_hallu.eval, lvlm_hallu.serve, "
               "lvlm_hallu.interventions; from lvlm_hallu.kernels import dispatch; print(k.__file__)")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """The project as a (non-editable) wheel, and HF kernels' wheels from the package index."""
    out = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
         cwd=out)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(out), *KERNELS], cwd=out)
    (project,) = out.glob("lvlm_hallu-*.whl")
    return {"project": project, "kernels": [p for p in out.glob("*.whl") if p != project]}


def _install(py: Path, wheels: list[Path], cwd: Path) -> None:
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheels)], cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["project-first", "kernels-first"])
def test_installed_beside_hf_kernels_both_import_and_uninstalling_one_keeps_the_other(wheels, tmp_path, order):
    py = _venv(tmp_path / "venv")
    work = tmp_path / "elsewhere"  # not the checkout: imports must come from the installs
    work.mkdir()
    steps = [[wheels["project"]], wheels["kernels"]]
    for batch in steps if order == "project-first" else steps[::-1]:
        _install(py, batch, work)
    hf, ours = _check(py, IMPORT_HF, work), _check(py, IMPORT_OURS, work)
    assert hf.returncode == 0, hf.stderr
    assert ours.returncode == 0, ours.stderr
    assert "/site-packages/kernels/" in hf.stdout and "/site-packages/lvlm_hallu/kernels/" in ours.stdout
    assert str(ROOT) not in hf.stdout + ours.stdout

    image = work / "scene.png"
    made = _check(py, "from lvlm_hallu.lvlm.shapes import make_scene; "
                      f"make_scene('test', 0)[1].save({str(image)!r})", work)
    assert made.returncode == 0, made.stderr
    gen = _run([str(py.parent / "lvlm"), "generate", "--model", "shapes", "--image", str(image), "-p",
                "Describe this image.", "--interventions", "vhr", "-n", "8", "--json"], cwd=work, timeout=300)
    import json

    result = json.loads(gen.stdout)
    assert result["model"] == "shapes" and result["completion_tokens"] >= 1
    assert "vhr" in result["intervention_report"]

    first, second = ("kernels", "lvlm-hallu") if order == "project-first" else ("lvlm-hallu", "kernels")
    _uninstall(py, first, tmp_path / "venv", work)
    left = _check(py, IMPORT_OURS if first == "kernels" else IMPORT_HF, work)
    assert left.returncode == 0, left.stderr
    gone = _check(py, IMPORT_HF if first == "kernels" else IMPORT_OURS, work)
    assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr
    _uninstall(py, second, tmp_path / "venv", work)
    assert _check(py, IMPORT_OURS if second == "lvlm-hallu" else IMPORT_HF, work).returncode != 0
