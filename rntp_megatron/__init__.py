"""rntp_megatron: RNTP reinforcement learning as a Megatron-Core plugin."""

from rntp_megatron.notices import quiet_megatron_notices

quiet_megatron_notices()  # before any megatron import: its fallback warnings become one line (notices.py)
