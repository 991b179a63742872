"""``lrscale init DIR`` / ``lrscale schema`` from a checkout (the wheel's copy is tested in
tests/integration/test_wheel_install.py): every example config arrives, still loads from its new place,
nothing is overwritten without --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrscale_megatron.cli import main
from lrscale_megatron.init_cmd import examples_dir, init_project
from lrscale_megatron.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_init_copies_every_example_and_they_load_from_there(tmp_path):
    assert examples_dir() == ROOT / "configs"
    paths = init_project(tmp_path / "run")
    shipped = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").glob("*/*.json"))
    copied = sorted(
        p.relative_to(tmp_path / "run" / "configs") for p in (tmp_path / "run" / "configs").glob("*/*.json")
    )
    assert copied == shipped and len(shipped) >= 15
    assert (tmp_path / "run" / "schemas" / "train.schema.json") in paths
    cfg = load_config(
        tmp_path / "run" / "configs" / "gpt" / "cpu-tiny.json"
    )  # "../deepspeed/..." still resolves
    assert (
        cfg.deepspeed["scheduler"]
        == load_config(ROOT / "configs" / "gpt" / "cpu-tiny.json").deepspeed["scheduler"]
    )
    settings = json.loads((tmp_path / "run" / ".vscode" / "settings.json").read_text())
    assert {"fileMatch": ["/configs/gpt/*.json"], "url": "./schemas/train.schema.json"} in settings[
        "json.schemas"
    ]


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert main(["init", str(tmp_path)]) == 0
    mine = tmp_path / "configs" / "gpt" / "cpu-tiny.json"
    mine.write_text("{}")
    assert main(["init", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err and mine.read_text() == "{}"
    assert main(["init", str(tmp_path), "--force"]) == 0
    assert mine.read_text() == (ROOT / "configs" / "gpt" / "cpu-tiny.json").read_text()


def test_schema_command(tmp_path, capsys):
    assert main(["schema"]) == 0 and "train" in capsys.readouterr().out.split()
    assert main(["schema", "train"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "TrainConfig"
    assert main(["schema", "nope"]) == 2 and "choose one of" in capsys.readouterr().err
    assert main(["schema", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "train.schema.json").is_file()


@pytest.mark.parametrize("name", ["cpu-demo", "ci-smoke"])
def test_compare_examples_point_at_a_copied_train_config(tmp_path, name):
    init_project(tmp_path)
    raw = json.loads((tmp_path / "configs" / "compare" / f"{name}.json").read_text())
    assert (tmp_path / "configs" / "compare" / raw["train_config"]).resolve().is_file()
