"""Model factories: megatron-core GPTModel presets and a plain-PyTorch GPT used as a reference."""
