"""``lrscale init DIR`` and ``lrscale schema``: the example configs and their JSON schemas, without a checkout.

    lrscale init my-run                 # my-run/configs/{gpt,deepspeed,compare,sweep}/*.json, my-run/schemas/,
                                        # my-run/.vscode/settings.json (schema per config folder)
    lrscale schema                      # the registered config names
    lrscale schema train                # the train config's JSON schema on stdout
    lrscale schema --out schemas/       # every schema as schemas/NAME.schema.json

A wheel carries the repository's ``configs/`` as ``lrscale_megatron/examples/`` (copied at build time by
``setup.py``); run from a checkout, the checkout's ``configs/`` is used. The relative paths inside the
configs (``"deepspeed": "../deepspeed/..."``, ``"train_config": "../gpt/cpu-tiny.json"``) hold in the copy.
Existing files are never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from lrscale_megatron.configs.registry import CONFIG_MODELS, config_names, config_schema

_PACKAGE = Path(__file__).resolve().parent


def examples_dir() -> Path:
    """The shipped example configs: ``lrscale_megatron/examples`` in an install, ``configs/`` in a checkout."""
    for d in (_PACKAGE / "examples", _PACKAGE.parent / "configs"):
        if d.is_dir() and any(d.glob("*/*.json")):
            return d
    raise FileNotFoundError(
        f"no example configs in {_PACKAGE / 'examples'} or {_PACKAGE.parent / 'configs'}: the package was "
        "built without them; reinstall lrscale-megatron from a wheel or run from a checkout"
    )


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_schemas(out: Path, names: list[str] | None = None) -> list[Path]:
    """``out/NAME.schema.json`` for each registered config (or the ``names`` given)."""
    paths = []
    for name in names or config_names():
        path = out / f"{name}.schema.json"
        _write_json(path, config_schema(name))
        paths.append(path)
    return paths


def init_project(directory: str | Path, force: bool = False) -> list[Path]:
    """Copy the example configs to ``directory/configs/``, write ``directory/schemas/`` and a VS Code
    ``json.schemas`` setting. Refuses (naming the file) to overwrite anything unless ``force``."""
    root, src = Path(directory), examples_dir()
    copies = {f: root / "configs" / f.relative_to(src) for f in sorted(src.glob("*/*.json"))}
    settings = root / ".vscode" / "settings.json"
    planned = [*copies.values(), *(root / "schemas" / f"{n}.schema.json" for n in config_names()), settings]
    clash = [p for p in planned if p.exists()]
    if clash and not force:
        raise FileExistsError(f"{clash[0]} exists ({len(clash)} files would be overwritten); use --force")
    for f, dst in copies.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    written = [*copies.values(), *write_schemas(root / "schemas")]
    _write_json(
        settings,
        {
            "json.schemas": [
                {"fileMatch": [f"/configs/{folder}/*.json"], "url": f"./schemas/{name}.schema.json"}
                for name, (_, folder) in sorted(CONFIG_MODELS.items())
                if folder is not None
            ]
        },
    )
    return [*written, settings]


def _run_init(args: argparse.Namespace) -> int:
    try:
        paths = init_project(args.directory, force=args.force)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = [p for p in paths if p.parent.parent.name == "configs"]
    print(f"{args.directory}: {len(configs)} configs, {len(paths) - len(configs)} schema/editor files")
    print(f"next: lrscale compare {Path(args.directory) / 'configs' / 'compare' / 'cpu-demo.json'}")
    return 0


def _run_schema(args: argparse.Namespace) -> int:
    names = args.names or ([] if args.out is None else config_names())
    unknown = [n for n in names if n not in CONFIG_MODELS]
    if unknown:
        print(f"error: unknown config {unknown[0]!r}; choose one of {config_names()}", file=sys.stderr)
        return 2
    if args.out is not None:
        for path in write_schemas(Path(args.out), names):
            print(path)
    elif not names:
        print("\n".join(config_names()))
    elif len(names) == 1:
        print(json.dumps(config_schema(names[0]), indent=2))
    else:
        print(json.dumps({n: config_schema(n) for n in names}, indent=2))
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init", help="write the example configs, their JSON schemas and editor settings to DIR"
    )
    p.add_argument("directory", help="where to write (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_run_init)
    s = sub.add_parser("schema", help="JSON schema of a config (no name: list the names)")
    s.add_argument("names", nargs="*", help=f"config names: {', '.join(config_names())}")
    s.add_argument(
        "--out", default=None, help="write NAME.schema.json files to this folder (all without names)"
    )
    s.set_defaults(func=_run_schema)
