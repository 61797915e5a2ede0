"""`s2m demo` plumbing: `run_demo` on tiny stand-ins of the shipped weights writes the grid and both reports with one
row per generator and target, and saves pipeline folders that reload and sample; the shipped weights load into
pipelines."""

import json
import os

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image
from test_pipeline import dcgan, spread_heads, tiny_unet

from s2m_diffusers.cli import main
from s2m_diffusers.demo import (
    ATTRIBUTE_NAMES,
    DDIM_STEPS,
    DIGITS_7TO3_PRETRAINED,
    GENERATORS,
    MICRO_BATCH_SIZE,
    SOURCE_CLASS_ATTRIBUTES,
    demo_settings,
    load_demo_pipeline,
    make_grid,
    run_demo,
)
from s2m_diffusers.evaluation import AttributeEvaluator, formula_accuracy
from s2m_diffusers.models.heads import S2MHeads
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.proposals import DDIMProposal, GeneratorProposal

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn
TARGETS = ["A", "B & ~C"]
FAST = {"pool_size": 16, "burn_in": 2, "negation_margin": 1.0, "presence_margin": 0.0}
TINY_SETTINGS = {"gan": FAST, "ddpm": {"num_inference_steps": 2, "max_proposals": 3000, **FAST}}


def tiny_heads(images: torch.Tensor) -> S2MHeads:
    torch.manual_seed(1)
    heads = S2MHeads(["A", "B", "C"], sample_size=8, in_channels=1, cnn_channels=(4, 8), label_counts=[10, 20, 30])
    return spread_heads(heads, images).eval()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A folder laid out like `pretrained/digits7to3`, with tiny 8x8 models."""
    root = tmp_path_factory.mktemp("pretrained")
    gan = dcgan()
    gan.save_pretrained(root / "gan")
    z = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    tiny_heads(GeneratorProposal(gan).generate(z)).save_pretrained(root / "heads_gan")
    unet, scheduler = tiny_unet().eval(), DDPMScheduler(num_train_timesteps=50)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "ddpm")
    with torch.no_grad():
        samples = DDIMProposal(unet, scheduler, 2)(128, torch.Generator().manual_seed(0))
    tiny_heads(samples).save_pretrained(root / "heads_ddpm")
    torch.manual_seed(0)
    AttributeEvaluator(ATTRIBUTE_NAMES, SOURCE_CLASS_ATTRIBUTES, sample_size=8, base_channels=4).save_pretrained(
        root / "evaluator"
    )
    return str(root)


@pytest.fixture(scope="module")
def demo_run(tiny_root, tmp_path_factory):
    """`run_demo` on the tiny stand-ins, run once: (its output folder, its report). Three images: two chains, one of
    which moves after the burn-in (with two images no chain moves, and there is no acceptance rate)."""
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(
        out, num_images=3, seed=0, targets=TARGETS, root=tiny_root, settings=TINY_SETTINGS, progress=False
    )
    return out, report


def test_run_demo_writes_grid_and_reports(demo_run):
    out, report = demo_run
    assert report["paths"] == {
        "grid": str(out / "grid.png"),
        "markdown": str(out / "report.md"),
        "json": str(out / "report.json"),
        "pipelines": {"gan": str(out / "pipelines" / "gan"), "ddpm": str(out / "pipelines" / "ddpm")},
    }
    saved = json.loads((out / "report.json").read_text())
    rows = saved["rows"]
    assert [(r["generator"], r["target"]) for r in rows] == [(g, t) for g in ("gan", "ddpm") for t in TARGETS]
    for r in rows:
        for key in ("generator", "target", "accuracy", "proposals_per_image", "acceptance_rate", "seconds"):
            assert key in r, key
        assert isinstance(r["warnings"], list) and 1 <= r["unique_images"] <= 3
        assert (r["unet_calls_per_image"] is None) == (r["generator"] == "gan")
        assert r["num_images"] == 3 and not r["budget_exhausted"]
        assert r["accuracy"] * 3 == pytest.approx(round(r["accuracy"] * 3))
        assert r["proposals_per_image"] == pytest.approx(r["proposals"] / 3)
        assert 0 < r["acceptance_rate"] <= 1 and r["seconds"] > 0
    # the pipeline's defaults for both generators; they differ only in their micro-batch size (memory, not images)
    assert saved["settings"] == {g: {"micro_batch_size": MICRO_BATCH_SIZE[g], **TINY_SETTINGS[g]} for g in GENERATORS}
    assert demo_settings(16, GENERATORS, None) == {g: {"micro_batch_size": MICRO_BATCH_SIZE[g]} for g in GENERATORS}
    with pytest.raises(ValueError, match="Unknown generators"):
        demo_settings(16, ["vae"], None)
    assert set(saved["summary"]) == {"gan", "ddpm"} and saved["num_images"] == 3 and saved["wall_seconds"] > 0

    markdown = (out / "report.md").read_text()
    assert "Sampler settings: the defaults" in markdown
    assert markdown.count("| gan | `") == 2 and markdown.count("| ddpm | `") == 2 and "`B & ~C`" in markdown
    assert "`pipelines/gan`, `pipelines/ddpm`" in markdown
    with Image.open(out / "grid.png") as grid:
        width, height = grid.size
    assert height > 2 * 48 and width > 120 + 4 * 48  # two rows; three images in each of two blocks


@pytest.mark.parametrize("kind", ["gan", "ddpm"])
def test_saved_pipelines_reload_and_sample_as_the_demo_did(demo_run, tiny_root, kind):
    out, report = demo_run
    folder = report["paths"]["pipelines"][kind]
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    reloaded = S2MPipeline.from_pretrained(folder)
    assert reloaded.heads.attribute_names == ["A", "B", "C"]
    kwargs = {"num_images": 1, "output_type": "pt", **TINY_SETTINGS[kind]}
    images = reloaded("A", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (1, 1, 8, 8)
    original = load_demo_pipeline(kind, tiny_root)(
        "A", generator=torch.Generator().manual_seed(0), **kwargs
    ).images  # the pipeline the demo assembled, loaded afresh
    assert torch.equal(images, original)


def test_make_grid_layout_and_formula_accuracy(tiny_root):
    blocks = {"gan": {"A": torch.ones(3, 1, 8, 8)}, "ddpm": {"A": torch.zeros(1, 1, 8, 8)}}
    grid = make_grid(blocks, ["A", "B"], cell=10, pad=2, label_width=50)
    assert grid.size == (50 + 2 * (60 + 2), 18 + 2 * 12 + 2)  # blocks at least 60 wide (their title)
    assert grid.getpixel((50, 18)) == (255, 255, 255)  # a white image in the first cell of the gan block
    assert grid.getpixel((50 + 62, 18)) == (0, 0, 0)  # a black image in the first cell of the ddpm block
    evaluator = AttributeEvaluator.from_pretrained(os.path.join(tiny_root, "evaluator"))
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert formula_accuracy(evaluator, images, "A | ~A") == 1.0  # every combination but "none" has A or not A
    assert formula_accuracy(evaluator, images, "A & B & C") <= formula_accuracy(evaluator, images, "A | B")
    with pytest.raises(ValueError, match="both requires and forbids"):
        formula_accuracy(evaluator, images, "A & ~A")
    with pytest.raises(ValueError, match="empty"):
        formula_accuracy(evaluator, images[:0], "A")


def test_demo_command_prints_the_paths(tiny_root, tmp_path, capsys, monkeypatch):
    import s2m_diffusers.demo as demo

    monkeypatch.setattr(demo, "DIGITS_7TO3_PRETRAINED", tiny_root)
    monkeypatch.setattr(demo, "SEVEN_TARGETS", ("A",))
    calls = {}

    def fake_run_demo(output_dir, **kwargs):
        calls.update(kwargs)
        return run_demo(output_dir, targets=["A"], root=tiny_root, settings=TINY_SETTINGS, **kwargs)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    out = tmp_path / "d"
    assert main(["demo", "--output", str(out), "--num-images", "1", "--seed", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert calls["num_images"] == 1 and calls["seed"] == 3 and not calls["retrain"]
    assert str(out / "grid.png") in printed and str(out / "report.json") in printed and "wall time" in printed
    assert str(out / "pipelines" / "gan") in printed


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(DIGITS_7TO3_PRETRAINED, "heads_gan")), reason="shipped heads not trained yet"
)
def test_shipped_weights_load_and_match():
    for kind in ("gan", "ddpm"):
        pipe = load_demo_pipeline(kind)
        assert pipe.heads.attribute_names == ["A", "B", "C"]
        assert (pipe.heads.config.sample_size, pipe.heads.config.in_channels) == (16, 1)
        assert pipe.proposal_kind == {"gan": "gan", "ddpm": "ddim"}[kind]
    assert pipe.config.num_inference_steps == DDIM_STEPS
