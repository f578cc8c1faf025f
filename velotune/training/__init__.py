"""Training: the SFTTrainer compatible with the seed's call and TRL's current one; responses-only masking;
atomic checkpoints; callbacks that stop on NaN/inf and advise on out-of-memory; the run report."""
from .callbacks import NonFiniteGuard, RunStats, oom_advice
from .checkpoints import AtomicCheckpointMixin, checkpoints, clean_interrupted_saves
from .responses_only import train_on_responses_only
from .trainer import SFTTrainer, to_sft_config

__all__ = ["SFTTrainer", "to_sft_config", "train_on_responses_only", "NonFiniteGuard", "RunStats", "oom_advice",
           "AtomicCheckpointMixin", "checkpoints", "clean_interrupted_saves"]
