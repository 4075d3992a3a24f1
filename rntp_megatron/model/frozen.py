"""Frozen GPTModels beside the policy (the KL reference, the site-selection proxy): this rank's stage of a model
card at the trainer's TP/PP layout, weights from a complete checkpoint, no gradients, forward-only through
megatron's schedule (rewards/scoring.py, data/proxy.py)."""

from __future__ import annotations

from typing import Optional

import torch

from rntp_megatron.config import ConfigError, ModelConfig, ParallelConfig, from_dict, load_card


def card_config(card: str, where: str) -> ModelConfig:
    """The ModelConfig of a model card (a name in model/cards or a YAML path); errors name `where`."""
    return from_dict(ModelConfig, {**load_card(card), "card": card}, where)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No gradients, eval mode, and per-token loss sums (so megatron's schedule leaves a forward-only 'loss'
    function's outputs unscaled, as for the DDP-wrapped policy)."""
    model.requires_grad_(False)
    model.eval()
    model.config.calculate_per_token_loss = True
    return model


def build_frozen(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, load: Optional[str], where: str
                 ) -> torch.nn.Module:
    """This rank's frozen stage of `model_cfg`, weights from the checkpoint `load` (model only); `where` names
    the config field in errors."""
    from rntp_megatron.checkpoint import CheckpointError, load_checkpoint
    from rntp_megatron.model.provider import build_model

    model = build_model(model_cfg, parallel_cfg)
    if load is not None:
        try:
            load_checkpoint(load, [model], optimizer=None)
        except CheckpointError as e:
            raise ConfigError(f"{where}: {e}") from e
    return freeze(model)
