"""What is trained: the GPTModel provider from a model card, layer specs, and the Megatron<->HF mapping."""
