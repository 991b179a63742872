"""lrscale-megatron."""
