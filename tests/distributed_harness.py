"""Tests' name for the spawner in rntp_megatron.runtime.spawn (run fn on N gloo ranks, collect results)."""

from rntp_megatron.runtime.spawn import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
