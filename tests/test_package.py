"""One importable name: the wheel holds only `cnnbench`, and a user's own `data`/`models`/… never load."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("common", "data", "models", "train", "export", "runtime", "bench", "gradcam", "demo")
USER_PACKAGES = ("data", "models", "common", "utils", "runtime", "export")


def make_user_packages(folder: Path) -> None:
    """Packages named like ours in the user's folder; importing any of them fails loudly."""
    for name in USER_PACKAGES:
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package was imported')\n")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A non-editable wheel built from a copy of the source tree (the build writes nothing into the repo)."""
    src = tmp_path_factory.mktemp("src") / "cnnbench"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", ".benchmarks"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("cnnbench-*.whl")
    return found


def test_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"cnnbench"}, sorted(top)
    for stage in STAGES:
        assert f"cnnbench/{stage}/__init__.py" in names, stage
    for module in ("cnnbench/__init__.py", "cnnbench/__main__.py", "cnnbench/cli.py"):
        assert module in names
    assert not [n for n in names if n.startswith("cnnbench/tests/")], "tests are not part of the package"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cnnbench = cnnbench.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_ignores_the_users_own_packages(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "project"
    work.mkdir()
    make_user_packages(work)
    probe = ("import sys, cnnbench, cnnbench.cli, cnnbench.runtime, cnnbench.data.synth, cnnbench.models.registry; "
             f"assert cnnbench.__file__.startswith({str(site)!r}), cnnbench.__file__; "
             f"loaded = [m for m in {USER_PACKAGES!r} if m in sys.modules]; "
             "assert not loaded, loaded; "
             "print(cnnbench.__version__, cnnbench.Predictor.__module__)")
    # `python -c` puts the working folder first on sys.path: the strongest test of a collision.
    done = subprocess.run([sys.executable, "-c", probe], cwd=work, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    version, module = done.stdout.split()
    assert module == "cnnbench.runtime.predictor"
    assert version == __import__("cnnbench").__version__


def test_python_m_cnnbench_is_the_cli(tmp_path):
    make_user_packages(tmp_path)
    done = subprocess.run([sys.executable, "-m", "cnnbench", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Train, export, verify, benchmark and explain" in done.stdout


def test_public_api_loads_lazily():
    import cnnbench

    assert {"Predictor", "load_checkpoint", "export_checkpoints", "train_model"} <= set(cnnbench.__all__)
    for name in cnnbench.__all__:
        assert getattr(cnnbench, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cnnbench.nope  # noqa: B018
