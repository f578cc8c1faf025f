"""Training: the SFTTrainer compatible with the seed's call and TRL's current one; responses-only masking."""
from .responses_only import train_on_responses_only
from .trainer import SFTTrainer, to_sft_config

__all__ = ["SFTTrainer", "to_sft_config", "train_on_responses_only"]
