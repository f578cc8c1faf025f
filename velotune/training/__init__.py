"""Training: the SFTTrainer compatible with the seed's call and TRL's current one."""
from .trainer import SFTTrainer, to_sft_config

__all__ = ["SFTTrainer", "to_sft_config"]
