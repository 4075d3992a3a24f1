"""Who writes the thoughts: the RolloutEngine contract and its engines (in-process Megatron, SGLang)."""
