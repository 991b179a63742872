"""SweepGrid with an lr_center law: per-group LR grids centred on a prior, validated."""

import math

import pytest

from lrscale_megatron.sweep.runner import SweepGrid

CENTER = {"coefficient": 0.5, "exponents": {"width": -1.0, "batch": 0.5}}


def _grid(**kw):
    base = dict(widths=(32, 128), depths=(1,), token_budgets=(1e5,), batch_tokens=(256, 1024), n_lr=5)
    return SweepGrid(**{**base, **kw})


def test_group_grids_are_centred_on_the_law():
    g = _grid(lr_center=CENTER, lr_span=16.0)
    runs = g.expand()
    assert len(runs) == 2 * 2 * 5
    for w in (32, 128):
        for b in (256, 1024):
            lrs = sorted(r["lr"] for r in runs if r["width"] == w and r["batch_tokens"] == b)
            centre = 0.5 * w**-1.0 * b**0.5
            assert math.isclose(math.sqrt(lrs[0] * lrs[-1]), centre, rel_tol=1e-5)
            assert math.isclose(lrs[-1] / lrs[0], 16.0, rel_tol=1e-5)
            assert math.isclose(lrs[1] / lrs[0], 2.0, rel_tol=1e-5)
    # groups differ: width x4 moves the whole grid down x4
    a = sorted(r["lr"] for r in runs if r["width"] == 32 and r["batch_tokens"] == 256)
    b = sorted(r["lr"] for r in runs if r["width"] == 128 and r["batch_tokens"] == 256)
    assert all(math.isclose(x / y, 4.0, rel_tol=1e-5) for x, y in zip(a, b, strict=True))


def test_centre_is_clamped():
    g = _grid(lr_center=CENTER, lr_span=4.0, lr_min=0.1, lr_max=0.5)
    assert g.center(32, 1, 1e5, 1024) == pytest.approx(0.5)  # 0.5 / 32 * 32 = 0.5: inside
    assert g.center(16, 1, 1e5, 1024) == pytest.approx(0.5)  # 1.0 clamped down
    assert g.center(128, 1, 1e5, 256) == pytest.approx(0.1)  # 0.0625 clamped up


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(lr_center=CENTER), "lr_span=None"),
        (dict(lr_center=CENTER, lr_span=1.0), "lr_span=1.0"),
        (dict(lr_center={"coefficient": -1, "exponents": {}}, lr_span=4.0), "coefficient=-1"),
        (dict(lr_center={"coefficient": 1, "exponents": {"heads": 1}}, lr_span=4.0), "exponents="),
        (dict(lr_center={"coefficient": 1, "exponents": {"width": "x"}}, lr_span=4.0), "exponents.width='x'"),
        (dict(lr_center={"c": 1}, lr_span=4.0), "lr_center="),
        (dict(lr_min=1e-3, lr_max=1e-2, lr_span=4.0), "without lr_center"),
        (dict(), "lr_min=None"),
    ],
)
def test_bad_center_configs_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        _grid(**kw)


def test_centred_lrs_need_the_group():
    g = _grid(lr_center=CENTER, lr_span=4.0)
    with pytest.raises(ValueError, match="needs the group"):
        g.lrs()
