"""Host-framework integrations: DeepSpeed registration and Megatron compatibility."""
