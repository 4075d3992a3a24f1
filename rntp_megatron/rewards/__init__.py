"""How answers are scored: a registry of reward functions and shaping terms (ALGORITHMS.md section 3)."""
