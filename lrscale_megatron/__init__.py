"""lrscale-megatron: learning-rate scaling laws and model-parallel Hessian spectra for GPT pretraining.

Importing the package makes ``"scheduler": {"type": "LRScale", ...}`` resolvable by
``deepspeed.initialize`` (registered when DeepSpeed's scheduler module loads; DeepSpeed itself is not
imported here). ``lrscale_megatron.integrations.deepspeed.register()`` does the same explicitly.
"""

from lrscale_megatron.integrations.deepspeed import register_on_import as _register_on_import

__version__ = "0.1.0"

_register_on_import()
