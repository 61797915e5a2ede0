"""S2M sampling for Hugging Face diffusers: multi-label samples from single-positive labels.

The maths lives in pure functions (``targets``, ``sampling``, ``refit``); models and pipelines build on them.
"""

from .refit import LowRankGaussianMixture, StandardNormal
from .sampling import (
    BudgetExhaustedError,
    SampleResult,
    SamplerStats,
    sample_imh,
    sample_official,
    sample_s2m,
)
from .targets import Target, TargetError, log_r, log_w, parse_target

__version__ = "0.1.0.dev0"

__all__ = [
    "BudgetExhaustedError",
    "LowRankGaussianMixture",
    "SampleResult",
    "SamplerStats",
    "StandardNormal",
    "Target",
    "TargetError",
    "log_r",
    "log_w",
    "parse_target",
    "sample_imh",
    "sample_official",
    "sample_s2m",
]
