"""S2M sampling for Hugging Face diffusers: multi-label samples from single-positive labels.

The maths is pure functions in ``maths`` (spec §3-5b); ``targets`` parses targets, ``densities`` holds the latent
prior ``p_z``, ``kernels``, ``chains``, ``screen`` and ``diagnostics`` the sampler that ``sampling`` drives over
callables, ``proposals`` the generator adapters, and ``S2MPipeline`` composes them. ``demo`` and ``testing`` hold
the demo's and the tests' worlds; the
library never imports them.
"""

# Every component module is imported here: diffusers 0.42.1 resolves a custom component only from a module
# that is already in sys.modules.
from . import distributed, hub
from .data import ImageBank, ImageBankProposal, SinglePositiveDataset, prepare_images
from .densities import StandardNormal
from .evaluation import AttributeEvaluator
from .maths import auto_dr_temperature, log_r, log_w, log_weight, temper_dr
from .models.gan import DCGANDiscriminator, DCGANGenerator
from .models.heads import S2MHeads, S2MHeadsOutput
from .pipeline_s2m import S2MPipeline, S2MPipelineOutput
from .priors import estimate_priors
from .proposals import DDIMProposal, GeneratorProposal, PipelineProposal, ProposalSample, execution_device
from .sampling import (
    BudgetExhaustedError,
    S2MSamplingConfig,
    SampleResult,
    SamplerStats,
    sample_imh,
    sample_official,
    sample_s2m,
)
from .targets import Target, TargetError, parse_target
from .training import train_heads

__version__ = "0.1.0.dev0"

__all__ = [
    "AttributeEvaluator",
    "BudgetExhaustedError",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DDIMProposal",
    "GeneratorProposal",
    "ImageBank",
    "ImageBankProposal",
    "PipelineProposal",
    "ProposalSample",
    "S2MHeads",
    "S2MHeadsOutput",
    "S2MPipeline",
    "S2MPipelineOutput",
    "S2MSamplingConfig",
    "SampleResult",
    "SamplerStats",
    "SinglePositiveDataset",
    "StandardNormal",
    "Target",
    "TargetError",
    "auto_dr_temperature",
    "distributed",
    "estimate_priors",
    "execution_device",
    "hub",
    "log_r",
    "log_w",
    "log_weight",
    "parse_target",
    "prepare_images",
    "sample_imh",
    "sample_official",
    "sample_s2m",
    "temper_dr",
    "train_heads",
]
