"""How answers are scored: a registry of reward functions and shaping terms (docs/method.md, section 3)."""

from rntp_megatron.rewards.compute import compute_rewards
from rntp_megatron.rewards.registry import REWARDS, RewardContext, RewardSpec, get_reward, register_reward

__all__ = ["REWARDS", "RewardContext", "RewardSpec", "compute_rewards", "get_reward", "register_reward"]
