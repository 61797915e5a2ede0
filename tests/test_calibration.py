"""How the sampler reads trained heads: margins and D_v strength chosen from data (s2m_diffusers.calibration)."""

import math
import os

import pytest
import torch

from s2m_diffusers import calibration
from s2m_diffusers.data import SinglePositiveDataset
from s2m_diffusers.maths import dv_strength
from s2m_diffusers.training import fit_temperature, train_heads

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bimodal_log_ratios(m: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """(m, 3) log ratios: attribute 0 is the strongest (0); attributes 1, 2 are held (log rho ~ N(-1, 0.3^2)) with
    probability 0.4, else lacking (~ N(-5, 0.5^2)). Returns them and the exact point where the two weighted
    densities are equal."""
    held = torch.rand(m, 2, generator=generator) < 0.4
    values = torch.where(
        held, -1.0 + 0.3 * torch.randn(m, 2, generator=generator), -5.0 + 0.5 * torch.randn(m, 2, generator=generator)
    ).clamp(max=0.0)  # the held group lies 3.3 sd below 0: the clamp changes nothing that matters
    ratios = torch.cat([torch.zeros(m, 1), values], dim=1).double()

    def log_density(x: float, weight: float, mean: float, sd: float) -> float:
        return math.log(weight) - math.log(sd) - 0.5 * ((x - mean) / sd) ** 2

    low, high = -5.0, -1.0
    for _ in range(100):  # bisection on the log-density difference, monotone between the means
        mid = 0.5 * (low + high)
        if log_density(mid, 0.4, -1.0, 0.3) > log_density(mid, 0.6, -5.0, 0.5):
            high = mid
        else:
            low = mid
    return ratios, 0.5 * (low + high)


def test_margins_come_from_the_boundary_of_generated_ratios_and_the_real_labels():
    generator = torch.Generator().manual_seed(0)
    generated, boundary = _bimodal_log_ratios(20_000, generator)
    # Real images: the labelled attribute's ratio is uniform on [0.2, 1]: its 5% quantile is 0.24.
    real = torch.zeros(4000, 3, dtype=torch.float64)
    labels = torch.randint(3, (4000,), generator=generator)
    real[torch.arange(4000), labels] = torch.empty(4000).uniform_(0.2, 1.0, generator=generator).log().double()
    lam, kappa, report = calibration.choose_margins(generated, real, labels)
    # The mixture's boundary against the exact one (about 8 standard errors of a 20,000-sample fit apart at most).
    assert math.log(report["boundary_rho"]) == pytest.approx(boundary, abs=0.05)
    # then as strict as every combination's support allows: half of it kept at lambda, less at the next step
    stricter = report["stricter"]
    assert lam == pytest.approx(stricter["factor"] / report["boundary_rho"]) and stricter["least_support_kept"] >= 0.5
    shares = calibration.support_shares(generated, ["a0", "a1", "a2"], lam * 1.6, kappa)
    base = calibration.support_shares(generated, ["a0", "a1", "a2"], 1 / report["boundary_rho"], kappa)
    assert min(shares[k] / v for k, v in base.items() if v >= 0.01) < 0.5 or lam * 1.6 > 100
    assert kappa == pytest.approx(0.24, abs=0.02) and report["presence_recall_real"] == pytest.approx(0.95, abs=0.01)
    assert 0.0 < report["generated_present_share"] < 1.0 and report["negation_margin_from"].startswith("mixture")


def test_margins_fall_back_to_the_default_when_the_ratios_are_not_two_groups():
    generator = torch.Generator().manual_seed(1)
    one_group = (-3.0 + torch.randn(500, 2, generator=generator)).clamp(max=0.0)
    unimodal = torch.cat([torch.zeros(500, 1), one_group], dim=1).double()
    lam, kappa, report = calibration.choose_margins(unimodal, unimodal, torch.zeros(500, dtype=torch.long), 0.95, 7.0)
    assert lam == 7.0 and report["negation_margin_from"].startswith("default")
    assert 1 / 7.0 <= kappa <= calibration.MAX_PRESENCE_MARGIN


def test_support_shares_of_exact_ratios_are_the_combination_shares():
    # Exact heads: rho_c = 1 on the attributes an image holds, 0 elsewhere. Images hold {A}, {A, B}, {A, B, C}.
    ratios = torch.tensor([[0.0, -math.inf, -math.inf], [0.0, 0.0, -math.inf], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    shares = calibration.support_shares(ratios, ["A", "B", "C"], negation_margin=10.0, presence_margin=0.5)
    assert shares["A & ~B & ~C"] == 0.25 and shares["A & B & ~C"] == 0.25 and shares["A & B & C"] == 0.5
    assert sum(shares.values()) == 1.0 and len(shares) == 7


def test_dv_strength_keeps_the_effective_sample_size_and_the_report_flags_a_separating_dv():
    generator = torch.Generator().manual_seed(2)
    heavy = 6.0 * torch.randn(2000, generator=generator)
    beta = calibration.choose_dv_strength(heavy)
    assert 0.0 < beta < 1.0 and calibration.ess_share(beta * heavy) == pytest.approx(0.1, abs=1e-3)
    assert beta == dv_strength(heavy)
    degenerate, sentence = calibration.dv_report(heavy, fitted_temperature=0.1, accuracy=0.995, beta=beta)
    assert degenerate and "separates" in sentence and f"{beta:.3g}" in sentence
    mild = 0.5 * torch.randn(2000, generator=generator)
    assert calibration.choose_dv_strength(mild) == 1.0
    assert calibration.dv_report(mild, fitted_temperature=1.2, accuracy=0.6, beta=1.0)[0] is False


def test_dv_temperature_is_never_below_one():
    # Separable logits: the NLL keeps falling as the logits grow, so a free fit sharpens as far as it may.
    z = torch.cat([torch.full((100,), 3.0), torch.full((100,), -3.0)])
    y = torch.cat([torch.ones(100), torch.zeros(100)]).long()
    assert fit_temperature(z, y) < 0.5
    assert fit_temperature(z, y, min_temperature=1.0) == 1.0


@pytest.mark.filterwarnings("ignore:S2M sampling")  # 2 images: the diagnostics may warn
def test_training_on_separable_data_flags_dv_and_stores_settings_that_the_pipeline_uses():
    from s2m_diffusers.models.gan import DCGANGenerator
    from s2m_diffusers.pipeline_s2m import S2MPipeline

    gan = DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=8).eval()
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 3
    # Real images are bright squares in one of three corners; the untrained GAN's images are anything but.
    images = torch.full((96, 1, 8, 8), -1.0)
    for i, c in enumerate(labels.tolist()):
        images[i, :, 3 * c : 3 * c + 3, 3 * c : 3 * c + 3] = 1.0
    images = (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    data = SinglePositiveDataset(images, labels, ["a", "b", "c"])

    def proposal(n, g):
        with torch.no_grad():
            return gan(torch.randn(n, 8, generator=g))

    heads, metrics = train_heads(
        data, proposal, num_steps=100, eval_steps=50, batch_size=16, learning_rate=1e-2, cnn_channels=[8],
        num_heldout_samples=64, progress=False,
    )  # fmt: skip
    assert metrics["dv_accuracy"] >= 0.98 and metrics["dv_degenerate"] and "separates" in metrics["dv_report"]
    assert heads.temperatures()["dv"] >= 1.0 and metrics["dv_temperature"] >= 1.0
    for key in ("negation_margin", "presence_margin", "dv_strength"):
        assert getattr(heads.config, key) == metrics[key]
    assert 0.0 <= metrics["dv_strength"] <= 1.0 and metrics["dv_ess_share"] >= 0.1 - 1e-3
    assert set(metrics["generated_support"]) >= {"a & ~b & ~c", "a & b & c"}

    pipe = S2MPipeline(heads=heads, gan=gan)
    fast = {"pool_size": 16, "burn_in": 2}
    out = pipe("a | b | c", num_images=2, generator=torch.manual_seed(0), **fast)
    stats = out.stats
    assert stats["dv_strength"] == heads.config.dv_strength
    assert (stats["negation_margin"], stats["presence_margin"]) == (heads.negation_margin, heads.presence_margin)
    out = pipe("a | b | c", num_images=2, dv_strength=1.0, presence_margin=0.0, **fast)
    assert out.stats["dv_strength"] == 1.0 and out.stats["presence_margin"] == 0.0


def test_dv_gradient_penalty_changes_only_what_dv_learns():
    data = SinglePositiveDataset(
        torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
        torch.arange(48) % 3,
        ["a", "b", "c"],
    )

    def proposal(n, g):
        return torch.rand(n, 1, 8, 8, generator=g) * 1.6 - 0.8

    small = {"cnn_channels": [8], "num_heldout_samples": 16, "progress": False, "batch_size": 8, "num_steps": 3}
    plain, _ = train_heads(data, proposal, **small)
    penalised, metrics = train_heads(data, proposal, dv_gradient_penalty=10.0, **small)
    assert not torch.equal(plain.dv_head.weight, penalised.dv_head.weight)
    assert torch.equal(plain.dr_head.weight, penalised.dr_head.weight)  # separate backbones: D_r is untouched
    assert math.isfinite(metrics["dv_nll_after"])
