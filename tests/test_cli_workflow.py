"""The user workflow end to end on tiny data: `s2m train-heads` -> `s2m sample` -> `s2m evaluate`.

Data: one sub-folder of 8x8 PNGs per attribute. Generators saved with `save_pretrained`: a tiny DCGANGenerator folder
and a tiny DDPMPipeline folder. Errors exit with status 2 and a message.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image
from test_pipeline import tiny_unet

from s2m_diffusers.cli import main
from s2m_diffusers.evaluation import AttributeEvaluator
from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.pipeline_s2m import S2MPipeline

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn

TINY_TRAINING = [
    "--num-steps",
    "2",
    "--batch-size",
    "8",
    "--num-heldout-samples",
    "16",
    "--priors",
    "none",
    "--negation-margin",
    "1",
    "--quiet",
]


def write_data(root) -> str:
    """Two attributes: `top` images are bright in the upper half, `bottom` ones in the lower half."""
    rng = np.random.default_rng(0)
    for name, rows in (("top", slice(0, 4)), ("bottom", slice(4, 8))):
        os.makedirs(root / name)
        for i in range(8):
            pixels = rng.integers(0, 60, (8, 8)).astype(np.uint8)
            pixels[rows] += 180
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    torch.manual_seed(0)
    DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4).save_pretrained(root / "gan")
    unet = tiny_unet()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(root / "ddpm")
    AttributeEvaluator(
        attribute_names=["bottom", "top"],
        class_attributes=[["bottom"], ["top"], ["bottom", "top"]],
        sample_size=8,
        base_channels=4,
    ).save_pretrained(root / "evaluator")
    return {"root": root, "data": write_data(root / "data")}


def sample_and_check(pipeline: str, images_dir, target="top", num_images=3, extra=()) -> dict:
    code = main(
        [
            "sample",
            "--pipeline",
            pipeline,
            "--target",
            target,
            "--num-images",
            str(num_images),
            "--output",
            str(images_dir),
            "--seed",
            "0",
            "--quiet",
            *extra,
        ]
    )
    assert code == 0
    stats = json.loads((images_dir / "stats.json").read_text())
    pngs = sorted(p for p in os.listdir(images_dir) if p.endswith(".png") and p != "grid.png")
    assert pngs == [f"{i:04d}.png" for i in range(num_images)] == stats["images"]
    assert (images_dir / "grid.png").is_file()
    assert stats["num_images"] == num_images and stats["seed"] == 0
    assert stats["proposals"] >= num_images
    assert stats["proposals_per_image"] == pytest.approx(stats["proposals"] / num_images)
    assert 0 < stats["acceptance_rate"] <= 1 and stats["kernel"] == "pcn"
    assert all(stats["on_target"]) and stats["chains"]["pool"]["on_target"] >= 1
    return stats


@pytest.mark.parametrize("kind", ["gan", "ddpm"])
def test_train_heads_sample_evaluate(workspace, tmp_path, kind, capsys):
    root = workspace["root"]
    out = tmp_path / "s2m"
    extra = (
        ["--num-inference-steps", "2", "--bank-size", "32", "--screen-heads-samples", "32"] if kind == "ddpm" else []
    )
    args = ["train-heads", "--generator", str(root / kind), "--data-dir", workspace["data"], "--output", str(out)]
    assert main(args + TINY_TRAINING + extra) == 0
    printed = capsys.readouterr()
    assert "wrote the S2M pipeline" in printed.out
    assert "drawing the sample bank" not in printed.err  # --quiet
    for name in ("model_index.json", "heads/config.json", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attribute_names"] == ["bottom", "top"] and metrics["label_counts"] == [8, 8]
    assert metrics["generator_kind"] == ("gan" if kind == "gan" else "ddim")

    pipe = S2MPipeline.from_pretrained(str(out))
    assert pipe.proposal_kind == ("gan" if kind == "gan" else "ddim")
    assert pipe.heads.attribute_names == ["bottom", "top"]
    if kind == "ddpm":
        assert pipe.config.num_inference_steps == 2
        # screen heads, distilled on the predicted clean image after the first of the 2 steps
        assert pipe.screen_heads.config.screen_steps == [1] and (out / "screen_heads" / "config.json").is_file()
        assert metrics["screen_heads"]["num_samples"] == 32
    else:
        assert pipe.screen_heads is None and not (out / "screen_heads").exists()

    images_dir = tmp_path / "images"
    stats = sample_and_check(str(out), images_dir, extra=["--screen", "1"] if kind == "ddpm" else [])
    if kind == "ddpm":
        assert stats["screen"]["step"] == 1 and stats["screen"]["surrogate"] == "screen_heads"

    assert main(["evaluate", "--images", str(images_dir), "--target", "top & ~bottom", "--evaluator",
                 str(root / "evaluator"), "--reference", str(root / "data" / "top")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert not (images_dir / "evaluation.json").exists()  # the samples folder stays as `s2m sample` wrote it
    result = json.loads((tmp_path / "images.evaluation.json").read_text())  # beside it by default
    assert main(["evaluate", "--images", str(images_dir), "--target", "top & ~bottom", "--evaluator",
                 str(root / "evaluator"), "--output", str(tmp_path / "reports" / "eval.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "reports" / "eval.json").read_text())["accuracy"] == result["accuracy"]
    assert result["num_images"] == 3 and result["num_reference"] == 8
    assert 0.0 <= result["accuracy"] <= 1.0 and result["accuracy"] * 3 == pytest.approx(round(result["accuracy"] * 3))
    assert result["frechet_distance"] >= 0.0
    assert "accuracy" in printed and "Frechet distance" in printed


def test_bad_inputs_exit_2_with_a_message(workspace, tmp_path, capsys):
    root, data = workspace["root"], workspace["data"]
    out = str(tmp_path / "out")

    def fails(args, *words):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("s2m: error:"), err
        for word in words:
            assert word in err, (word, err)

    train = ["train-heads", "--output", out, *TINY_TRAINING]
    fails([*train, "--generator", str(tmp_path / "missing"), "--data-dir", data], "neither a folder nor a Hub repo")
    (tmp_path / "empty").mkdir()
    fails([*train, "--generator", str(tmp_path / "empty"), "--data-dir", data], "model_index.json", "config.json")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"_class_name": "NoSuchGenerator"}))
    fails([*train, "--generator", str(tmp_path / "odd"), "--data-dir", data], "NoSuchGenerator")
    fails([*train, "--generator", str(root / "gan"), "--data-dir", str(tmp_path / "nodata")], "does not exist")
    fails([*train, "--generator", str(root / "gan"), "--data-dir", data, "--priors", "0.5,x"], "--priors")
    fails([*train, "--generator", str(root / "gan"), "--data-dir", data, "--priors", "0.5"], "2 attributes")
    fails([*train, "--generator", str(root / "gan"), "--data-dir", data, "--num-steps", "0"], "--num-steps")
    assert not os.path.exists(out)

    evaluate = ["evaluate", "--target", "top", "--evaluator", str(root / "evaluator")]
    fails([*evaluate, "--images", str(tmp_path / "none")], "does not exist")
    fails(["evaluate", "--target", "top", "--evaluator", str(tmp_path), "--images", data + "/top"], "--evaluator")
    fails(["evaluate", "--target", "top & purple", "--evaluator", str(root / "evaluator"), "--images",
           data + "/top"], "purple")  # fmt: skip
    fails(["demo", "--num-images", "0", "--output", out], "--num-images")


def test_help_explains_the_new_commands(capsys):
    for command, options in {
        "train-heads": ["--generator", "--data-dir", "--output", "--num-steps", "--priors", "--negation-margin"]
        + ["--train_data_dir", "--output_dir", "--max_train_steps", "--checkpointing_steps", "--use_ema"]
        + ["--resume_from_checkpoint", "--mixed_precision", "--report_to", "--push_to_hub", "--hub_model_id"],
        "evaluate": ["--images", "--target", "--evaluator", "--reference"],
        "demo": ["--output", "--retrain", "--num-images", "--seed"],
    }.items():
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text
        for option in options:
            assert option in text, (command, option)


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.skipif(shutil.which("s2m") is None, reason="the console script is not installed")
def test_console_script_train_heads(workspace, tmp_path):
    out = tmp_path / "s2m"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["train-heads", "--generator", str(workspace["root"] / "gan"), "--data-dir", workspace["data"]]
    result = subprocess.run(
        ["s2m", *args, "--output", str(out), *TINY_TRAINING], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model_index.json").is_file() and "wrote the S2M pipeline" in result.stdout


def test_train_heads_draws_a_diffusion_generators_bank_once_with_a_progress_bar(workspace, capsys):
    from types import SimpleNamespace

    from s2m_diffusers.cli_train_heads import _training_proposal
    from s2m_diffusers.hub import load_generator_folder
    from s2m_diffusers.proposals import DDIMProposal
    from s2m_diffusers.training import sample_bank

    kind, components = load_generator_folder(str(workspace["root"] / "ddpm"))
    args = SimpleNamespace(num_inference_steps=2, bank_size=6, seed=3, quiet=False)
    bank = _training_proposal(args, kind, components, 8, 1)
    assert "drawing the sample bank" in capsys.readouterr().err
    quiet = _training_proposal(SimpleNamespace(**{**vars(args), "quiet": True}), kind, components, 8, 1)
    assert "drawing the sample bank" not in capsys.readouterr().err
    assert torch.equal(bank.images, quiet.images) and bank.images.shape == (6, 1, 8, 8)
    proposal = DDIMProposal(components["unet"], components["scheduler"], 2)  # the bank is one call of the proposal
    assert torch.equal(bank.images, proposal(6, torch.Generator().manual_seed(3 + 12345)))
    assert torch.equal(bank.images, sample_bank(proposal, 6, seed=3, progress=False).images)
