"""How scores become gradients: advantages, vocab-parallel log-probs, the GRPO loss as a Megatron loss hook."""
