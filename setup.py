"""Build hook only (the metadata is in pyproject.toml): a wheel carries the repository's example configs.

``configs/<folder>/*.json`` is copied to ``lrscale_megatron/examples/<folder>/`` in the build, where
``lrscale init DIR`` finds them after ``pip install`` (see lrscale_megatron/init_cmd.py). An sdist carries
``configs/`` through MANIFEST.in.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithExamples(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "configs"
        dst = Path(self.build_lib) / "lrscale_megatron" / "examples"
        files = sorted(src.glob("*/*.json"))
        if not files:
            raise FileNotFoundError(f"no example configs under {src}: build from a checkout or an sdist")
        for f in files:
            (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / f.parent.name / f.name)


setup(cmdclass={"build_py": BuildPyWithExamples})
