"""How answers are scored: a registry of reward functions and shaping terms (docs/method.md, section 3).

Import what you need from its modules (rewards.registry, rewards.compute, ...): the package itself imports
nothing, so that config.py can consult the registry without reading the rest of the package back into itself.
"""
