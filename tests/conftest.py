import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

from pathlib import Path  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]


def steplaw_csv() -> Path:
    """The shared Step Law runs: `shared/` sits beside the checkout (CI's clone too)."""
    for root in (_REPO.parent / "shared", Path("/work/shared")):
        p = root / "data" / "steplaw" / "dense_lr_bs_loss.subset.csv"
        if p.is_file():
            return p
    raise FileNotFoundError(f"Step Law CSV not found in {_REPO.parent / 'shared'}/data/steplaw/")
