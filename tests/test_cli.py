"""The `s2m` command: `s2m sample` writes PNGs, stats.json and the latents; errors exit with a message."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_pipeline import gan_pipeline

from s2m_diffusers.cli import build_parser, main
from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.pipeline_s2m import S2MPipeline

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "s2m"
    gan_pipeline().save_pretrained(folder)
    return str(folder)


def sample_args(pipeline, output, *extra):
    return [
        "sample",
        "--pipeline",
        pipeline,
        "--target",
        "A & ~B",
        "--num-images",
        "3",
        "--output",
        str(output),
        "--negation-margin",
        "1",
        "--quiet",
        *extra,
    ]


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "sample" in out and "COMMAND --help" in out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    for option in ["--pipeline", "--target", "--num-images", "--output", "--seed", "--kernel", "--max-proposals"]:
        assert option in out, option
    assert "--refit" not in out and "--fit-size" not in out and "--fit-spend" not in out
    assert "examples:" in out and "a & (b | c) & ~d" in out
    assert main([]) == 2  # no command: help, usage error


def test_sample_writes_images_stats_and_latents(saved, tmp_path, capsys):
    assert main(sample_args(saved, tmp_path / "a", "--seed", "3")) == 0
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["0000.png", "0001.png", "0002.png", "grid.png", "latents.safetensors", "stats.json"]
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["seed"] == 3 and stats["target"] == "A & ~B" and stats["images"] == files[:3]
    assert stats["grid"] == "grid.png"
    with Image.open(tmp_path / "a" / "grid.png") as grid:  # 2 x 2 cells of 8 x 8 images enlarged to 64, a header
        assert grid.height == 2 * 64 + 16 and grid.width >= 2 * 64
    assert stats["proposals_per_image"] * stats["num_images"] == pytest.approx(stats["proposals"])
    assert stats["on_target"] == [True] * 3 and stats["kernel"] == "pcn"
    assert stats["chains"]["num_chains"] == 2 and "split_rhat" in stats["diagnostics"]
    assert load_file(str(tmp_path / "a" / "latents.safetensors"))["latents"].shape == (3, 8)
    assert "wrote 3 images" in capsys.readouterr().out
    # same seed, same images; the random default seed is recorded so that a run can be repeated
    assert main(sample_args(saved, tmp_path / "b", "--seed", "3")) == 0
    for name in files[:3]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(sample_args(saved, tmp_path / "c")) == 0
    seed = json.loads((tmp_path / "c" / "stats.json").read_text())["seed"]
    assert main(sample_args(saved, tmp_path / "d", "--seed", str(seed))) == 0
    assert (tmp_path / "c" / "0000.png").read_bytes() == (tmp_path / "d" / "0000.png").read_bytes()


def test_sample_of_two_images_has_no_acceptance_rate_and_still_succeeds(saved, tmp_path, capsys):
    """Two images: two chains return one image each at the end of the burn-in, so no chain moves after it and the
    acceptance rate is `None`; the run is still a success (exit 0), and stats.json says so."""
    args = sample_args(saved, tmp_path / "a", "--seed", "0")
    args[args.index("--num-images") + 1] = "2"
    assert main(args) == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["num_images"] == 2 and stats["acceptance_rate"] is None and stats["chains"]["moves"] == 0
    assert "wrote 2 images" in capsys.readouterr().out


def test_errors_exit_with_a_message(saved, tmp_path, capsys):
    code = main(["sample", "--pipeline", saved, "--target", "A & ~Z", "--output", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "Unknown attribute 'Z'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    code = main(["sample", "--pipeline", str(tmp_path / "nowhere"), "--target", "A", "--output", str(tmp_path)])
    assert code == 2 and "neither a folder nor a Hub repo id" in capsys.readouterr().err
    args = sample_args(saved, tmp_path / "y", "--seed", "0", "--max-proposals", "2")
    assert main(args) == 1
    err = capsys.readouterr().err  # what the pool saw, and what to try in the words of `s2m sample`
    assert "budget of 2 ran out" in err and "Of the entry pool's 2 draws" in err
    assert "--max-proposals 8" in err and "max_proposals=" not in err
    assert main([*args, "--allow-partial"]) == 1  # partial results are written, and the status says so
    assert json.loads((tmp_path / "y" / "stats.json").read_text())["budget_exhausted"] is True
    for removed in (["--kernel", "maybe"], ["--refit", "off"], ["--fit-size", "32"], ["--fit-spend", "full"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["sample", "--pipeline", saved, "--output", "o", *removed])
    capsys.readouterr()
    assert main(sample_args(saved, tmp_path / "z", "--seed", "0", "--kernel", "independent")) == 0
    assert json.loads((tmp_path / "z" / "stats.json").read_text())["kernel"] == "independent"


def test_sample_presence_margin_reaches_the_pipeline(saved, tmp_path, capsys):
    assert main(sample_args(saved, tmp_path / "a", "--seed", "0", "--presence-margin", "0.3")) == 0
    assert main(sample_args(saved, tmp_path / "b", "--presence-margin", "2")) == 2
    assert "--presence-margin must lie in [0, 1]" in capsys.readouterr().err
    assert main(sample_args(saved, tmp_path / "c", "--screen-min-finish", "0")) == 2
    assert "--screen-min-finish must be a probability in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.skipif(shutil.which("s2m") is None, reason="the console script is not installed")
def test_console_script_is_installed():
    result = subprocess.run(["s2m", "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--num-images" in result.stdout


def test_sample_memory_options(saved, tmp_path):
    """--num-chains and --cpu-offload (the offloading hooks on the CPU here) give the same images."""
    assert main(sample_args(saved, tmp_path / "a", "--seed", "5")) == 0
    assert main(sample_args(saved, tmp_path / "b", "--seed", "5", "--cpu-offload", "--micro-batch-size", "2")) == 0
    for name in ("0000.png", "0001.png", "0002.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(sample_args(saved, tmp_path / "c", "--seed", "5", "--num-chains", "1")) == 0
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert stats["num_images"] == 3 and stats["num_processes"] == 1
    assert main(sample_args(saved, tmp_path / "d", "--num-chains", "0")) == 2


def _tiny_gan_and_data(tmp_path):
    """A tiny saved DCGAN and two 4-image attribute folders (`a`, `b`) under `tmp_path`: their paths."""
    gan = tmp_path / "gan"
    torch.manual_seed(0)
    DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4).save_pretrained(gan)
    data = tmp_path / "data"
    for name in ("a", "b"):
        os.makedirs(data / name)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i + (100 if name == "a" else 0)).save(data / name / f"{i}.png")
    return gan, data


def test_train_heads_sample_size_must_not_exceed_the_generator(tmp_path, capsys):
    gan, data = _tiny_gan_and_data(tmp_path)
    args = ["train-heads", "--generator", str(gan), "--data-dir", str(data), "--output", str(tmp_path / "out")]
    assert main([*args, "--sample-size", "16", "--quiet"]) == 2
    assert "--resolution (--sample-size) must be between 1 and the generator's image size 8" in capsys.readouterr().err
    small = [*args, "--sample-size", "4", "--num-steps", "1", "--batch-size", "4", "--num-heldout-samples", "8"]
    assert main([*small, "--priors", "none", "--quiet"]) == 0
    pipe = S2MPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.heads.config.sample_size == 4 and pipe.gan.config.sample_size == 8
    out = pipe(
        "a", num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt", pool_size=16, burn_in=2
    )
    assert out.images.shape == (2, 1, 8, 8)  # the generator's size; the heads saw 4x4 copies


def test_train_heads_with_diffusers_flag_names_checkpoints_and_resume(tmp_path, capsys, monkeypatch):
    gan, data = _tiny_gan_and_data(tmp_path)
    out = tmp_path / "out"
    args = ["train-heads", "--pretrained_model_name_or_path", str(gan), "--train_data_dir", str(data)]
    args += ["--output_dir", str(out), "--resolution", "8", "--train_batch_size", "4", "--num_heldout_samples", "8"]
    args += ["--learning_rate", "1e-3", "--mixed_precision", "no", "--gradient_accumulation_steps", "1"]
    args += ["--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--no-use_ema", "--priors", "none"]
    args += ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1", "--license", "mit", "--quiet"]
    assert main([*args, "--max_train_steps", "2"]) == 0, capsys.readouterr().err
    assert "scheduler.bin" in os.listdir(out / "checkpoints" / "checkpoint-2")  # the schedule resumes too
    assert [d for d in os.listdir(out / "checkpoints") if d.startswith("checkpoint-")] == ["checkpoint-2"]
    S2MPipeline.from_pretrained(str(out))  # the checkpoints sit beside the pipeline, outside its manifest
    for name in ("metrics.json", "README.md", "model_index.json", "gan/config.json"):
        assert str(tmp_path) not in (out / name).read_text(), name  # no local path is recorded
    assert "license: mit" in (out / "README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generator"] == "gan" and metrics["lr_scheduler"] == "constant_with_warmup"
    assert main([*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]) == 0, capsys.readouterr().err
    assert [d for d in os.listdir(out / "checkpoints") if d.startswith("checkpoint-")] == ["checkpoint-3"]
    S2MPipeline.from_pretrained(str(out))
    assert main([*args, "--max_train_steps", "0"]) == 2
    assert "--max_train_steps (--num-steps) must be at least 1" in capsys.readouterr().err
    assert main([*args, "--max_train_steps", "3", "--lr_scheduler", "constant"]) == 2  # warm-up without effect
    assert "use --lr_scheduler constant_with_warmup" in capsys.readouterr().err

    from huggingface_hub import HfApi
    from test_hub import StandInHub

    hub_api = StandInHub(tmp_path / "cache")
    for name in ("create_repo", "upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, name, lambda self, *a, _name=name, **k: getattr(hub_api, _name)(*a, **k))
    push = ["--push_to_hub", "--hub_model_id", "user/tiny-s2m", "--max_train_steps", "1"]
    assert main([*args, *push]) == 0, capsys.readouterr().err
    uploaded = hub_api.calls[1][2]
    assert "model_index.json" in uploaded and not [f for f in uploaded if f.startswith("checkpoints/")]
    assert "license: mit" in hub_api.calls[2][3] and "user/tiny-s2m" in capsys.readouterr().out


def _tiny_train_heads_args(tmp_path) -> list[str]:
    """`s2m train-heads` arguments for one step on a tiny DCGAN and two 4-image attribute folders under `tmp_path`."""
    gan, data = _tiny_gan_and_data(tmp_path)
    args = ["train-heads", "--generator", str(gan), "--train_data_dir", str(data), "--output_dir", str(tmp_path / "o")]
    args += ["--max_train_steps", "1", "--train_batch_size", "4", "--num_heldout_samples", "8", "--priors", "none"]
    return args


def test_train_heads_backbone_from_a_local_transformers_folder(tmp_path, capsys):
    from test_heads import TINY_VIT
    from transformers import AutoConfig, AutoModel

    config = dict(TINY_VIT)
    AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).save_pretrained(tmp_path / "vit")
    args = _tiny_train_heads_args(tmp_path)
    assert main([*args, "--backbone", str(tmp_path / "vit"), "--quiet"]) == 0, capsys.readouterr().err
    heads = S2MPipeline.from_pretrained(str(tmp_path / "o")).heads
    assert heads.config.transformers_config["model_type"] == "vit"
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["backbone"] == "vit" and str(tmp_path) not in json.dumps(metrics)


def test_train_heads_lr_schedulers_are_diffusers_names():
    from s2m_diffusers.cli_common import LR_SCHEDULERS
    from s2m_diffusers.training import LR_SCHEDULERS as TRAINING_LR_SCHEDULERS

    assert sorted(LR_SCHEDULERS) == sorted(TRAINING_LR_SCHEDULERS)
    args = build_parser().parse_args(
        ["train-heads", "--generator", "g", "--train_data_dir", "d", "--output_dir", "o", "--logging_dir", "logs"]
    )
    assert (args.lr_scheduler, args.lr_warmup_steps, args.logging_dir) == ("constant", 0, "logs")


def test_train_heads_backbone_from_a_hub_id_downloads_only_when_online(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    from test_heads import TINY_VIT
    from transformers import AutoConfig, AutoModel

    config = dict(TINY_VIT)
    vit = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    calls = []

    def from_pretrained(name, **kwargs):  # stands in for the download
        calls.append((name, kwargs))
        return vit

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        raise EntryNotFoundError(f"{repo_id} has no {filename}")

    monkeypatch.setattr(AutoModel, "from_pretrained", from_pretrained)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    args = _tiny_train_heads_args(tmp_path)
    args += ["--backbone", "user/tiny-vit", "--backbone_revision", "0123abc", "--quiet"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(args) == 2
    assert "'user/tiny-vit' is not a local folder and HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(args) == 0, capsys.readouterr().err
    assert calls == [
        ("user/tiny-vit", {"local_files_only": False, "revision": "0123abc"}),
        ("user/tiny-vit", "preprocessor_config.json", "0123abc"),
    ]
    heads = S2MPipeline.from_pretrained(str(tmp_path / "o")).heads
    assert heads.config.transformers_config["model_type"] == "vit" and heads.config.transformers_checkpoint is None
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (metrics["backbone"], metrics["backbone_revision"]) == ("user/tiny-vit", "0123abc")


def test_example_train_heads_writes_a_pipeline(tmp_path):
    import runpy

    gan, data = _tiny_gan_and_data(tmp_path)
    example = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "train_heads.py"))
    args = ["--pretrained_model_name_or_path", str(gan), "--train_data_dir", str(data)]
    metrics = example["main"]([*args, "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1"])
    assert metrics["steps"] == 1
    assert S2MPipeline.from_pretrained(str(tmp_path / "o")).heads.attribute_names == ["a", "b"]
