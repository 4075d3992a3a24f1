"""rntp_megatron: RNTP reinforcement learning as a Megatron-Core plugin."""
