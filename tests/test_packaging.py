"""What a user installs works: the sdist, and the wheel built from it, installed elsewhere.

The test suite otherwise runs against the editable install, which reads the
checkout: a module, py.typed or LICENSE left out of the archives would go
unnoticed there.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).parent.parent
SOURCE = ROOT / "src" / "pamphlet"
LEFTOVERS = (".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", "site")


def clean_environment() -> dict[str, str]:
    """The environment without anything that would point Python at the checkout."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("PYTHON") and name != "VIRTUAL_ENV"
    }


def run(*command, **options):
    options = {"capture_output": True, "text": True, "timeout": 300, **options}
    return subprocess.run([str(part) for part in command], **options)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """The sdist, and the wheel that ``python -m build`` builds from the sdist."""
    # From a copy without the checkout's build leftovers: setuptools would read
    # the file list of an old pamphlet.egg-info (the editable install's) and
    # put in the sdist a file that a fresh clone's sdist would leave out.
    tree = tmp_path_factory.mktemp("source") / "pamphlet"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*LEFTOVERS))
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend comes from the test extra, not the network.
    proc = run(
        sys.executable,
        "-m",
        "build",
        "--no-isolation",
        "--outdir",
        out,
        tree,
        env=clean_environment(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sdist,) = out.glob("pamphlet-*.tar.gz")
    (wheel,) = out.glob("pamphlet-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(
    archives: tuple[pathlib.Path, pathlib.Path], tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A fresh virtual environment outside the checkout with only the wheel in it."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    proc = run(sys.executable, "-m", "venv", "--without-pip", venv, env=clean_environment())
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    # pamphlet has no runtime dependency: nothing to fetch.
    proc = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-index",
        "--no-deps",
        "--disable-pip-version-check",
        archives[1],
        env=clean_environment(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def demo(*command: str | pathlib.Path, password: str, cwd: pathlib.Path):
    return run(
        *command,
        input=password + "\n",
        cwd=cwd,
        env=clean_environment(),
        timeout=120,
        start_new_session=True,  # no terminal: the demo reads the pipe
    )


def test_both_archives_carry_the_license(archives):
    sdist, wheel = archives
    license_text = (ROOT / "LICENSE").read_text()
    assert "MIT License" in license_text
    top = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(f"{top}/LICENSE")
        assert member is not None
        assert member.read().decode() == license_text
        assert f"{top}/src/pamphlet/py.typed" in archive.getnames()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(f"{dist_info}/licenses/LICENSE").decode() == license_text
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()


def test_the_wheel_has_every_file_of_the_package(archives):
    _, wheel = archives
    expected = {
        path.relative_to(SOURCE.parent).as_posix()
        for path in SOURCE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "pamphlet/py.typed" in expected
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("pamphlet/")}
    assert expected == packaged


def test_installed_wheel_is_typed_and_imported_from_the_venv(installed, tmp_path):
    code = (
        "import importlib.resources, pamphlet; print(pamphlet.__file__); "
        "print(importlib.resources.files('pamphlet').joinpath('py.typed').is_file())"
    )
    proc = run(installed / "bin" / "python", "-c", code, cwd=tmp_path, env=clean_environment())
    assert proc.returncode == 0, proc.stderr
    location, typed = proc.stdout.split()
    assert pathlib.Path(location).is_relative_to(installed)
    assert typed == "True"


@pytest.mark.parametrize("entry", ["module", "script"])
def test_installed_wheel_runs_the_demo_login(installed, tmp_path, entry):
    command = (
        [installed / "bin" / "python", "-m", "pamphlet"]
        if entry == "module"
        else [installed / "bin" / "pamphlet"]
    )
    proc = demo(*command, "--demo", password="pamphlet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pamphlet: successfully authenticated" in proc.stdout
    assert "pamphlet: session has successfully been closed." in proc.stdout
    assert "Welcome, demo!" in proc.stderr


def test_installed_wheel_refuses_a_wrong_demo_password(installed, tmp_path):
    proc = demo(
        installed / "bin" / "python", "-m", "pamphlet", "--demo", password="wrong", cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "authenticate failed: AuthenticationError" in proc.stderr
    assert "successfully authenticated" not in proc.stdout
