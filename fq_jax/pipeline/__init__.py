"""The training pipeline behind `train.py` (stages, steps, sharding, checkpoints)."""

from fq_jax.pipeline.configuration import ConfigError, compression_rules, parse_rule, validate
from fq_jax.pipeline.train_lib import run

__all__ = ["ConfigError", "compression_rules", "parse_rule", "run", "validate"]
