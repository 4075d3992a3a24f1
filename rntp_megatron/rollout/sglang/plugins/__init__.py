"""Model classes that SGLang servers import from outside SGLang (SGLANG_EXTERNAL_MODEL_PACKAGE): this folder goes
on a server's PYTHONPATH, and its package `rntp_delta_models` serves SGLang's own classes with a load_weights that
also takes lossless weight deltas (rollout.sglang.delta_sync). The package imports only torch and SGLang, never the
trainer."""

from __future__ import annotations

from pathlib import Path

PACKAGE = "rntp_delta_models"


def served_env() -> dict[str, str]:
    """The environment variables a server needs to serve the delta-taking classes (PYTHONPATH: only this folder)."""
    return {"PYTHONPATH": str(Path(__file__).resolve().parent), "SGLANG_EXTERNAL_MODEL_PACKAGE": PACKAGE}
