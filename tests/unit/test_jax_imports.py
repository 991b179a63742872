"""Import boundaries: the package never imports jax; the JAX API and the law's predict need no torch;
without the extra, lrscale_megatron.jax fails with the install command. Each check runs in a child
process (a meta-path finder blocks the named package there, as if it were not installed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent(
    """
    import sys

    class _Block:
        def __init__(self, names):
            self.names = names

        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in self.names:
                raise ImportError(f"No module named {fullname!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, _Block(BLOCKED))
    """
)


def _run(code: str, blocked: tuple[str, ...] = ()) -> str:
    src = f"BLOCKED = {blocked!r}\n" + BLOCK + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_lrscale_megatron_never_imports_jax():
    out = _run(
        """
        import lrscale_megatron, lrscale_megatron.scheduler, lrscale_megatron.curvature
        from lrscale_megatron.curvature import lanczos, HessianOperator
        from lrscale_megatron.law.predict import predict
        print("jax" in sys.modules, "optax" in sys.modules)
        """
    )
    assert out.split() == ["False", "False"]


def test_without_the_extra_the_jax_api_names_it_and_the_rest_works():
    out = _run(
        """
        import lrscale_megatron
        from lrscale_megatron.scheduler import LRScaleConfig
        from lrscale_megatron.curvature import lanczos
        try:
            import lrscale_megatron.jax
        except ImportError as e:
            print("ERR", e)
        """,
        blocked=("jax", "jaxlib", "optax"),
    )
    assert out.startswith("ERR ") and "pip install 'lrscale-megatron[jax]'" in out and "jax" in out


def test_predict_and_the_jax_api_need_no_torch():
    out = _run(
        """
        import jax.numpy as jnp
        import lrscale_megatron
        from lrscale_megatron.law.lawfile import load_law
        from lrscale_megatron.law.predict import predict
        from lrscale_megatron.jax import lambda_max, optax_schedule

        pred = predict(load_law("steplaw-dense"), params=1.2e8, tokens=2.5e9, batch_tokens=524288)
        sched = optax_schedule(pred, total_steps=100, warmup_steps=10)
        p = {"w": jnp.array([[2.0, 0.5], [0.5, 1.0]])}
        res = lambda_max(lambda p, x: 0.5 * jnp.sum((x @ p["w"]) ** 2), p, jnp.eye(2), tol=1e-5)
        print(pred.peak_lr > 0, float(sched(10)) > 0, res.converged, "torch" in sys.modules)
        """,
        blocked=("torch",),
    )
    assert out.split() == ["True", "True", "True", "False"]
