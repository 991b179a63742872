"""Config models: the pydantic base every lrscale-megatron config subclasses (:mod:`.base`)."""

from lrscale_megatron.configs.base import ConfigError, ConfigModel, did_you_mean, strip_comments

__all__ = ["ConfigError", "ConfigModel", "did_you_mean", "strip_comments"]
