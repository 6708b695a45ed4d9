"""Release readiness: one version source, metadata, `python -m build` + `twine check`, what the wheel holds, and the
installed wheel registering the plugin in a fresh environment.

The package is built once per module from a copy of the sources (so the build writes nothing into the checkout),
without build isolation (offline: the running environment's setuptools builds it).
"""

import email
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pytest_nnsight

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "pytest_nnsight")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason="needs the test extra: pip install -e '.[test]' (make venv does)")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_the_version_has_one_source():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pytest_nnsight.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+)?", pytest_nnsight.__version__)


def test_the_changelog_has_an_entry_for_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(pytest_nnsight.__version__)}\]?", text, re.M), (
        "CHANGELOG.md: no section for this version"
    )


def test_built_metadata_has_the_version_urls_classifiers_and_license(dist):
    meta = _metadata(dist[0])
    assert meta["Name"] == "pytest-nnsight" and meta["Version"] == pytest_nnsight.__version__
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) >= {"Homepage", "Documentation", "Changelog", "Issues"}
    classifiers = meta.get_all("Classifier")
    assert "Framework :: Pytest" in classifiers and any(c.startswith("Development Status") for c in classifiers)
    assert meta["License-Expression"] == "MIT" and meta["Requires-Python"] == ">=3.10"


def test_twine_check_passes(dist):
    pytest.importorskip("twine", reason="needs the test extra: pip install -e '.[test]' (make venv does)")
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_the_wheel_holds_the_package_and_bundled_models_and_nothing_else(dist):
    with zipfile.ZipFile(dist[0]) as z:
        names = z.namelist()
        top = {n.split("/", 1)[0] for n in names}
        assert top == {"pytest_nnsight", f"pytest_nnsight-{pytest_nnsight.__version__}.dist-info"}, top
        assert not [
            n
            for n in names
            if "__pycache__" in n or n.endswith((".pyc", ".tmp")) or "/tests/" in n or ".pytest_cache" in n
        ]
        sources = {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / "pytest_nnsight").rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert sources <= set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"
        for model in ("capitals", "induction"):
            base = ROOT / "pytest_nnsight" / "bundled" / model
            manifest = json.loads((base / "manifest.json").read_text())
            for f in base.iterdir():
                if f.is_file():
                    assert z.read(f"pytest_nnsight/bundled/{model}/{f.name}") == f.read_bytes(), f
            weights = z.read(f"pytest_nnsight/bundled/{model}/model.safetensors")
            assert hashlib.sha256(weights).hexdigest() in json.dumps(manifest), (
                f"{model}: the wheel's weights are not the manifest's"
            )
        assert "pytest_nnsight/compatibility.json" in names


def test_the_installed_wheel_lists_its_options_in_pytest_help(dist, tmp_path):
    """A fresh venv (no pip: dependencies seen through a .pth to this environment), the wheel installed without deps."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    here = [p for p in sys.path if p.endswith("site-packages")]
    # torch, pytest, nnsight...: not the editable checkout
    (site / "_dependencies.pth").write_text("\n".join(here) + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(dist[0]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    where = subprocess.run(
        [str(python), "-c", "import pytest_nnsight; print(pytest_nnsight.__file__, pytest_nnsight.__version__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel's copy, not the checkout
    assert where.stdout.split()[1] == pytest_nnsight.__version__
    helped = subprocess.run(
        [str(python), "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert helped.returncode == 0, helped.stderr[-3000:]
    for flag in ("--nnsight-device", "--nnsight-report", "--nnsight-review", "--nnsight-snapshot-refresh-env"):
        assert flag in helped.stdout, f"{flag} is not in the installed plugin's pytest --help"
    assert "nnsight_device" in helped.stdout  # ini keys too
