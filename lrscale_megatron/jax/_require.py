"""The check that :mod:`lrscale_megatron.jax` has its optional dependencies, with an error naming the extra."""

from __future__ import annotations

import importlib

EXTRA_HINT = "pip install 'lrscale-megatron[jax]'"


def require_jax() -> None:
    """Raise :class:`ImportError` naming the ``jax`` extra when jax or optax cannot be imported."""
    for name in ("jax", "optax"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(
                f"lrscale_megatron.jax needs {name}, which cannot be imported ({e}); fix: {EXTRA_HINT} "
                "(the optional `jax` extra: jax, jaxlib, optax; CPU wheels unless you install a GPU jaxlib)"
            ) from e
