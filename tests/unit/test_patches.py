"""The Megatron-LM fork patch is well formed and uses only our public API that exists.

Offline: Megatron-LM is not fetched. ``git apply --check`` against the base commit is in
``patches/megatron-lm/README.md``; here we check what can be checked from the file alone: the header
names the base commit, the diff touches exactly the intended files, every hunk's line counts match its
``@@`` header (what ``git apply`` verifies first), the added Python parses, and every
``lrscale_megatron`` name it imports exists, is public, and is called with keywords it accepts.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "megatron-lm" / "0001-lrscale-scheduler.patch"
README = ROOT / "patches" / "megatron-lm" / "README.md"
TARGETS = {
    "megatron/training/arguments.py",
    "megatron/training/training.py",
    "megatron/training/training_config.py",
}
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: list[str] = field(default_factory=list)

    @property
    def added(self) -> list[str]:
        return [line[1:] for line in self.lines if line.startswith("+")]


def parse_patch(text: str) -> tuple[str, dict[str, list[Hunk]]]:
    """``(header, {path: hunks})`` of a git diff."""
    header, _, body = text.partition("\ndiff --git ")
    files: dict[str, list[Hunk]] = {}
    current: list[Hunk] | None = None
    for line in ("diff --git " + body).splitlines():
        if line.startswith("diff --git "):
            a, b = line[len("diff --git ") :].split(" ")
            assert a[2:] == b[2:], f"rename/copy not expected: {line}"
            current = files.setdefault(b[2:], [])
        elif line.startswith(("--- ", "+++ ", "index ")):
            continue
        elif (m := HUNK.match(line)) is not None:
            assert current is not None
            old_start, old_len, new_start, new_len = (int(g) if g is not None else 1 for g in m.groups())
            current.append(Hunk(old_start, old_len, new_start, new_len))
        elif current and line[:1] in (" ", "+", "-", "\\"):
            current[-1].lines.append(line)
        elif current and line == "":
            current[-1].lines.append(" ")  # an empty context line whose space was stripped
    return header, files


@pytest.fixture(scope="module")
def patch() -> tuple[str, dict[str, list[Hunk]]]:
    return parse_patch(PATCH.read_text())


def test_header_names_the_upstream_base(patch):
    header, _ = patch
    m = re.search(r"^base-commit:\s+([0-9a-f]{40})\s*$", header, re.M)
    assert m, "the header must name the upstream commit: base-commit: <40 hex digits>"
    assert re.search(r"^base-date:\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", header, re.M)
    assert "NVIDIA/Megatron-LM" in header
    assert re.search(r"package_info\.py: 0\.16\.\d", header), "the base must be a megatron-core 0.16.x commit"
    readme = README.read_text()
    assert m.group(1) in readme and "git apply --check" in readme


def test_targets_and_hunk_counts(patch):
    text = PATCH.read_text()
    _, files = patch
    assert set(files) == TARGETS
    for path, hunks in files.items():
        assert f"--- a/{path}\n+++ b/{path}\n" in text
        assert hunks, path
        for h in hunks:
            body = [x for x in h.lines if not x.startswith("\\")]
            old = sum(x[:1] in (" ", "-") for x in body)
            new = sum(x[:1] in (" ", "+") for x in body)
            assert (old, new) == (h.old_len, h.new_len), (path, h.old_start, old, new)
    removed = [x for hs in files.values() for h in hs for x in h.lines if x.startswith("-")]
    assert len(removed) == 1 and "lr_decay_style: Literal" in removed[0]  # only the choices line changes


def _added_code(hunk: Hunk) -> ast.Module:
    return ast.parse(textwrap.dedent("\n".join(hunk.added)))


def test_added_python_parses_and_adds_the_style(patch):
    from lrscale_megatron.integrations.megatron import DECAY_STYLE_NAME

    _, files = patch
    trees = {p: [_added_code(h) for h in hs] for p, hs in files.items()}  # raises on a syntax error
    (cfg,) = trees["megatron/training/training_config.py"]
    (ann,) = [n for n in ast.walk(cfg) if isinstance(n, ast.AnnAssign)]
    literal = ast.literal_eval(ann.annotation.slice)  # type: ignore[attr-defined]
    assert DECAY_STYLE_NAME in literal and {"constant", "linear", "cosine", "WSD"} <= set(literal)
    training = "\n".join(ast.unparse(t) for t in trees["megatron/training/training.py"])
    assert f"args.lr_decay_style == '{DECAY_STYLE_NAME}'" in training


def test_uses_only_existing_public_api(patch):
    pytest.importorskip("megatron.core")
    _, files = patch
    used: dict[str, object] = {}
    calls: list[ast.Call] = []
    for hunks in files.values():
        for h in hunks:
            tree = _added_code(h)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lrscale_megatron"):
                    mod = importlib.import_module(node.module or "")
                    for alias in node.names:
                        assert not alias.name.startswith("_"), f"private name {alias.name} in the patch"
                        assert alias.name in getattr(mod, "__all__", ()), (
                            f"{alias.name} not in {mod.__name__}.__all__"
                        )
                        used[alias.asname or alias.name] = getattr(mod, alias.name)
                elif isinstance(node, ast.Call):
                    calls.append(node)
    assert {"add_lrscale_args", "config_from_megatron_args", "LRScaleParamScheduler"} <= set(used)
    for call in calls:
        if isinstance(call.func, ast.Name) and call.func.id in used:
            params = inspect.signature(used[call.func.id]).parameters  # type: ignore[arg-type]
            for kw in call.keywords:
                assert kw.arg in params, f"{call.func.id}() has no keyword {kw.arg!r}"
