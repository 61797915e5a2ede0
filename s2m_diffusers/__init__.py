"""S2M sampling for Hugging Face diffusers: multi-label samples from single-positive labels.

The maths lives in pure functions (``targets``, ``sampling``, ``refit``); models and pipelines build on them.
"""

# Every component module is imported here: diffusers 0.42.1 resolves a custom component only from a module
# that is already in sys.modules.
from . import distributed, hub
from .data import ImageBankProposal, SinglePositiveDataset, prepare_images
from .evaluation import AttributeEvaluator
from .models.gan import DCGANDiscriminator, DCGANGenerator
from .models.heads import S2MHeads, S2MHeadsOutput
from .pipeline_s2m import S2MPipeline, S2MPipelineOutput
from .priors import estimate_priors
from .proposals import DDIMProposal, GeneratorProposal, PipelineProposal, ProposalSample, execution_device
from .refit import LowRankGaussianMixture, StandardNormal
from .sampling import (
    BudgetExhaustedError,
    SampleResult,
    SamplerStats,
    sample_imh,
    sample_official,
    sample_s2m,
)
from .shapes import ShapesGenerator, shapes_attributes, shapes_single_positive
from .targets import Target, TargetError, auto_dr_temperature, log_r, log_w, parse_target, temper_dr
from .training import train_heads

__version__ = "0.1.0.dev0"

__all__ = [
    "AttributeEvaluator",
    "BudgetExhaustedError",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DDIMProposal",
    "GeneratorProposal",
    "PipelineProposal",
    "ProposalSample",
    "S2MHeads",
    "S2MHeadsOutput",
    "S2MPipeline",
    "S2MPipelineOutput",
    "ImageBankProposal",
    "SinglePositiveDataset",
    "estimate_priors",
    "distributed",
    "execution_device",
    "hub",
    "prepare_images",
    "train_heads",
    "LowRankGaussianMixture",
    "SampleResult",
    "SamplerStats",
    "StandardNormal",
    "ShapesGenerator",
    "Target",
    "TargetError",
    "auto_dr_temperature",
    "log_r",
    "log_w",
    "parse_target",
    "sample_imh",
    "sample_official",
    "sample_s2m",
    "shapes_attributes",
    "shapes_single_positive",
    "temper_dr",
]
