"""Law files, predict(), CLI fit -> predict round trip, bad inputs name the field."""

from __future__ import annotations

import argparse
import io
import json
import shutil

import numpy as np
import pytest

from lrscale_megatron.law.cli import add_subcommands
from lrscale_megatron.law.data import DataError, load_steplaw_csv
from lrscale_megatron.law.lawfile import LawFileError, law_from_dict, load_law, shipped_law_names
from lrscale_megatron.law.predict import deepspeed_scheduler_block, predict
from tests.conftest import steplaw_csv

CSV = steplaw_csv()


def _cli(argv: list[str]) -> tuple[int, str]:
    ap = argparse.ArgumentParser(prog="lrscale")
    add_subcommands(ap.add_subparsers(required=True))
    args = ap.parse_args(argv)
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


def test_shipped_laws_load():
    assert {"steplaw-dense", "steplaw-published"} <= set(shipped_law_names())
    pub = load_law("steplaw-published")
    assert pub.coefficient == 1.79 and pub.exponents == {"params": -0.713, "tokens": 0.307}
    assert pub.batch_law is not None and pub.batch_law.exponents == {"tokens": 0.571}
    p = predict(pub, params=1e9, tokens=1e11)
    assert p.peak_lr == pytest.approx(1.79 * 1e9**-0.713 * 1e11**0.307)
    assert p.batch_tokens == pytest.approx(0.58 * 1e11**0.571)
    dense = load_law("steplaw-dense")
    assert dense.bootstrap_log_c and dense.fitted_ranges and dense.cv


def test_predict_interval_and_extrapolation_warning():
    law = load_law("steplaw-dense")
    lo_p = law.fitted_ranges["params"][0]
    p = predict(law, params=lo_p, tokens=2e10, batch_tokens=1e6)
    assert p.interval[0] <= p.peak_lr <= p.interval[1] and p.interval[0] < p.interval[1]
    assert not p.warnings
    far = predict(law, params=lo_p / 4, tokens=2e10, batch_tokens=1e6)
    assert any("params" in w and "4x below" in w for w in far.warnings)
    block = deepspeed_scheduler_block(p, warmup_steps=100, total_steps=1000)
    assert block == {
        "type": "LRScale",
        "params": {"peak_lr": p.peak_lr, "warmup_steps": 100, "total_steps": 1000},
    }
    from lrscale_megatron.scheduler import LRScaleConfig

    cfg = LRScaleConfig.from_dict(block["params"], where="scheduler.params")  # what DeepSpeed will be given
    assert cfg.peak_lr == p.peak_lr and cfg.warmup_steps == 100 and cfg.total_steps == 1000
    # DeepSpeed's own WarmupLR key is not LRScale's: the block passes it through, the scheduler refuses it
    bad = deepspeed_scheduler_block(p, warmup_num_steps=100, total_steps=1000)
    with pytest.raises(ValueError, match="warmup_num_steps.*did you mean 'warmup_steps'"):
        LRScaleConfig.from_dict(bad["params"], where="scheduler.params")


def test_predict_bad_inputs_name_field():
    law = load_law("steplaw-dense")
    with pytest.raises(ValueError, match="params=-1"):
        predict(law, params=-1, tokens=1e10, batch_tokens=1e6)
    with pytest.raises(LawFileError, match="unknown law name 'nope'"):
        load_law("nope")


def test_bad_law_file_names_field(tmp_path):
    d = load_law("steplaw-published").to_dict()
    bad = json.loads(json.dumps(d))
    bad["exponents"]["tokens"] = "big"
    with pytest.raises(LawFileError, match="'exponents.tokens'"):
        law_from_dict(bad)
    bad = json.loads(json.dumps(d))
    del bad["provenance"]
    with pytest.raises(LawFileError, match="'provenance'"):
        law_from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["coefficient"] = -1
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(LawFileError, match="'coefficient'"):
        load_law(f)


def test_missing_csv_column_named(tmp_path):
    lines = (
        CSV.read_text().splitlines()[:5]
        if CSV.is_file()
        else ["h,numl,N,D,bs,lr,smooth loss", "1,1,1,1,1,1,1"]
    )
    header = lines[0].split(",")
    drop = header.index("smooth loss")
    f = tmp_path / "x.csv"
    f.write_text("\n".join(",".join(v for i, v in enumerate(line.split(",")) if i != drop) for line in lines))
    with pytest.raises(DataError, match="missing column 'smooth loss'"):
        load_steplaw_csv(f)
    f.write_text("h,numl,N,D,bs,lr,smooth loss\n960,7,-5,1e9,16,1e-3,2.5\n")
    with pytest.raises(DataError, match="column 'N'"):
        load_steplaw_csv(f)


def test_cli_fit_then_predict_roundtrip(tmp_path):
    small = tmp_path / "steplaw.csv"
    shutil.copy(CSV, small)
    out = tmp_path / "law.json"
    rc, text = _cli(
        [
            "fit",
            "--steplaw-csv",
            str(small),
            "--predictors",
            "params,tokens,batch",
            "--out",
            str(out),
            "--folds",
            "3",
            "--bootstrap",
            "10",
        ]
    )
    assert rc == 0 and "ablation" in text and out.is_file()
    rc, text = _cli(
        [
            "predict",
            "--params",
            "3e8",
            "--tokens",
            "2e10",
            "--batch-tokens",
            "1e6",
            "--law",
            str(out),
            "--json",
        ]
    )
    doc = json.loads(text)
    assert rc == 0 and set(doc) >= {"peak_lr", "interval", "batch_tokens", "warnings", "deepspeed_scheduler"}
    assert doc["deepspeed_scheduler"]["params"]["peak_lr"] == doc["peak_lr"]
    assert np.isfinite(doc["peak_lr"])


def test_cli_refuses_width_depth_on_steplaw(capsys):
    rc, _ = _cli(
        [
            "fit",
            "--steplaw-csv",
            str(CSV),
            "--predictors",
            "width,depth,tokens,batch",
            "--bootstrap",
            "0",
            "--folds",
            "0",
        ]
    )
    assert rc == 2
    assert "width, depth cannot be separated" in capsys.readouterr().err


def test_cli_unknown_law(capsys):
    rc, _ = _cli(["predict", "--params", "1e9", "--tokens", "1e10", "--law", "no-such-law"])
    assert rc == 2 and "unknown law name 'no-such-law'" in capsys.readouterr().err


def test_cli_predict_writes_a_ready_scheduler_block():
    from lrscale_megatron.scheduler import LRScaleConfig

    rc, text = _cli(["predict", "--params", "3e8", "--tokens", "2e10", "--batch-tokens", "1e6", "--json"])
    block = json.loads(text)["deepspeed_scheduler"]
    assert rc == 0 and block["type"] == "LRScale"
    assert block["params"]["total_steps"] == 20000 and block["params"]["warmup_steps"] == 200
    cfg = LRScaleConfig.from_dict(block["params"], where="scheduler.params")  # accepted as is
    assert cfg.peak_lr == block["params"]["peak_lr"]
