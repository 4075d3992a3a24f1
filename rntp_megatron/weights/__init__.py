"""How trained weights leave the trainer: Megatron shards -> HF-named full tensors, engine sync, HF export."""
