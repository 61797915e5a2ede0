"""Bad inputs and faults, tried as a new user would, through the Python API and the `s2m` command: each one is a
clear error of a fitting type (the command: a non-zero status, one message naming the problem and the fix, no
traceback), found at once, and nothing is left half-written. (Kills: `test_kills.py`.)"""

import json
import math
import os
import shutil
import time
import warnings

import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from PIL import Image
from safetensors.torch import load_file, save_file
from test_pipeline import FAST, dcgan, gan_pipeline, seeded
from test_training import SMALL, CountingProposal, _data
from torch import nn

from s2m_diffusers import hub
from s2m_diffusers.cli import main
from s2m_diffusers.data import SinglePositiveDataset
from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.proposals import GeneratorProposal
from s2m_diffusers.targets import MAX_NESTING, TargetError, parse_target
from s2m_diffusers.training import train_heads

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn
KWARGS = dict(num_images=2, negation_margin=1.0, output_type="pt", **FAST)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability") / "s2m"
    gan_pipeline().save_pretrained(folder)
    return folder


def copy_of(saved, tmp_path, name="copy"):
    folder = tmp_path / name
    shutil.copytree(saved, folder)
    return folder


def sample(pipeline, output, *extra, target="A & ~B"):
    """`s2m sample` of 3 images (with 2, no chain moves after the burn-in: see test_cli's test of two images)."""
    args = ["sample", "--pipeline", str(pipeline), "--target", target, "--output", str(output), "--quiet"]
    return main([*args, "--num-images", "3", "--negation-margin", "1", "--seed", "0", *extra])


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("s2m: error: "), err
    return err


# ---------------------------------------------------------------------------------------------------------------
# 1, 7, 8, 9: loading refuses a folder whose parts do not belong together, naming what is wrong


def test_a_folder_mixing_two_saves_is_refused(saved, tmp_path, capsys):
    """The state a kill between moved entries of an older save left: the old generator with the new heads."""
    other = tmp_path / "other"
    pipe = gan_pipeline()
    with torch.no_grad():
        pipe.heads.dr_head.weight.add_(1.0)
    pipe.save_pretrained(other)
    mixed = copy_of(saved, tmp_path, "mixed")
    shutil.rmtree(mixed / "heads")
    shutil.copytree(other / "heads", mixed / "heads")
    with pytest.raises(ValueError, match=r"does not match its manifest.*heads/diffusion_pytorch_model\.safetensors"):
        S2MPipeline.from_pretrained(mixed)
    assert sample(mixed, tmp_path / "out") == 2
    assert "different saves" in error_of(capsys) and not (tmp_path / "out").exists()
    # a weights file dropped into a component folder is not part of the save either
    extra = copy_of(saved, tmp_path, "extra")
    shutil.copy(extra / "heads" / "diffusion_pytorch_model.safetensors", extra / "heads" / "other.safetensors")
    with pytest.raises(ValueError, match=r"were not saved with it: heads/other\.safetensors"):
        S2MPipeline.from_pretrained(extra)


def test_a_missing_component_folder_is_named(saved, tmp_path, capsys):
    folder = copy_of(saved, tmp_path)
    shutil.rmtree(folder / "heads")
    with pytest.raises(ValueError, match=r"heads \(S2MHeads\), but the folder\(s\) heads/ are missing"):
        S2MPipeline.from_pretrained(folder)
    assert sample(folder, tmp_path / "out") == 2
    err = error_of(capsys)
    assert "heads/ are missing" in err and "trust_remote_code" not in err


def edit_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_unknown_classes_are_refused_and_newer_versions_warned_about(saved, tmp_path, capsys):
    folder = copy_of(saved, tmp_path, "pipeline_class")
    edit_index(folder, _class_name=["pipeline", "NoSuchPipeline"])
    with pytest.raises(ValueError, match="names the pipeline class 'NoSuchPipeline'"):
        S2MPipeline.from_pretrained(folder)
    assert sample(folder, tmp_path / "o1") == 2 and "NoSuchPipeline" in error_of(capsys)

    folder = copy_of(saved, tmp_path, "heads_class")
    edit_index(folder, heads=["s2m_diffusers_models_heads", "NoSuchHeads"])
    with pytest.raises(ValueError, match="names the heads class 'NoSuchHeads'"):
        S2MPipeline.from_pretrained(folder)
    edit_index(folder, heads=["s2m_diffusers.models.heads", "NoSuchHeads"])  # diffusers' own layout
    with pytest.raises(ValueError, match=r"s2m_diffusers\.models\.heads\.NoSuchHeads, which the installed"):
        S2MPipeline.from_pretrained(folder)
    assert sample(folder, tmp_path / "o2") == 2 and "NoSuchHeads" in error_of(capsys)

    folder = copy_of(saved, tmp_path, "future")
    edit_index(folder, _diffusers_version="99.0.0")
    manifest = json.loads((folder / hub.MANIFEST_FILE).read_text())
    (folder / hub.MANIFEST_FILE).write_text(json.dumps({**manifest, "s2m_diffusers_version": "99.0"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S2MPipeline.from_pretrained(folder)
    messages = " ".join(str(w.message) for w in caught)
    assert "saved with diffusers 99.0.0, newer than the installed" in messages
    assert "saved with s2m-diffusers 99.0, newer than the installed" in messages
    assert sample(folder, tmp_path / "o3") == 0  # loads, and says so
    assert "s2m: warning: " in capsys.readouterr().err


def test_weights_in_pickle_form_are_refused(saved, tmp_path, capsys):
    folder = copy_of(saved, tmp_path)
    weights = folder / "heads" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "heads" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(
        ValueError, match=r"heads/ of .* holds weights in pickle form \(diffusion_pytorch_model\.bin\)"
    ):
        S2MPipeline.from_pretrained(folder)
    assert sample(folder, tmp_path / "out") == 2 and "safetensors only" in error_of(capsys)


def test_a_folder_without_a_manifest_loads_with_a_warning(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / hub.MANIFEST_FILE).unlink()
    with pytest.warns(UserWarning, match="has no s2m_manifest.json"):
        S2MPipeline.from_pretrained(folder)


def test_saving_over_a_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files \(thesis\.tex\) but no saved pipeline"):
        gan_pipeline().save_pretrained(folder)
    assert os.listdir(folder) == ["thesis.tex"]


def test_a_saved_pipeline_folder_is_replaced_whole_keeping_other_files(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "notes.txt").write_text("mine")
    S2MPipeline.from_pipe(gan_pipeline()).save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    manifest = json.loads((folder / hub.MANIFEST_FILE).read_text())
    assert "notes.txt" not in manifest["files"] and set(manifest["components"]) == {"gan", "heads"}


# ---------------------------------------------------------------------------------------------------------------
# 2, 3: `s2m sample` writes a whole folder; `s2m evaluate` refuses an incomplete or mixed one


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    from s2m_diffusers.evaluation import AttributeEvaluator

    folder = tmp_path_factory.mktemp("evaluator")
    torch.manual_seed(0)
    AttributeEvaluator(["A", "B", "C"], [["A"], ["B"], ["C"]], sample_size=8, base_channels=4).save_pretrained(folder)
    return str(folder)


def test_sample_refuses_a_folder_that_holds_files_unless_overwrite(saved, tmp_path, evaluator, capsys):
    out = tmp_path / "samples"
    assert sample(saved, out) == 0
    capsys.readouterr()
    (out / "0007.png").write_bytes((out / "0000.png").read_bytes())  # a stale image from another run
    before = sorted(os.listdir(out))
    assert sample(saved, out) == 2
    assert "already holds files" in error_of(capsys) and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert sorted(os.listdir(out)) == before
    evaluate = ["evaluate", "--images", str(out), "--target", "A", "--evaluator", evaluator]
    assert main(evaluate) == 2 and "0007.png" in error_of(capsys)  # not counted silently
    assert sample(saved, out, "--overwrite") == 0  # replaced whole: the stale image is gone
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "grid.png", "latents.safetensors"] + [
        "stats.json"
    ]
    assert main(evaluate) == 0 and "accuracy" in capsys.readouterr().out
    # --overwrite replaces only what `s2m sample` wrote
    (out / "thesis.tex").write_text("mine")
    assert sample(saved, out, "--overwrite") == 2 and "thesis.tex" in error_of(capsys)
    assert (out / "thesis.tex").exists()
    # an output of an older, killed run (images and latents, no stats.json) is refused by evaluate
    (out / "thesis.tex").unlink()
    (out / "stats.json").unlink()
    assert main(evaluate) == 2 and "no stats.json" in error_of(capsys)


# ---------------------------------------------------------------------------------------------------------------
# 4, 5, 13: generators out of range, NaN from any component, at once and by name


class ByteGAN(ModelMixin, ConfigMixin):
    """A generator whose images lie in [0, 255]."""

    @register_to_config
    def __init__(self, latent_dim: int = 8, sample_size: int = 8, out_channels: int = 1):
        super().__init__()
        self.net = nn.Linear(latent_dim, out_channels * sample_size * sample_size)

    def forward(self, z):
        c, s = self.config.out_channels, self.config.sample_size
        return (torch.tanh(self.net(z)).view(-1, c, s, s) + 1) * 127.5


def test_a_generator_out_of_range_is_refused_on_its_first_batch(tmp_path, capsys):
    torch.manual_seed(0)
    pipe = S2MPipeline(heads=gan_pipeline().heads, gan=ByteGAN())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"ByteGAN \(GeneratorProposal\) returned images in \[\d.*, 2\d\d.*\]") as err:
        pipe("A", **KWARGS)
    assert "output_range" in str(err.value)
    # through the command: a saved pipeline whose generator's recorded range is wrong
    wrong = gan_pipeline()
    wrong.gan.register_to_config(output_range=[-0.1, 0.1])
    wrong.save_pretrained(tmp_path / "wrong")
    assert sample(tmp_path / "wrong", tmp_path / "out", target="A") == 2
    assert "DCGANGenerator (GeneratorProposal) returned images in [" in error_of(capsys)
    assert not (tmp_path / "out").exists()
    # the fix the message names
    pipe.gan.register_to_config(output_range=[0, 255])
    assert pipe("A", generator=seeded(0), **KWARGS).images.shape == (2, 1, 8, 8)
    proposal = GeneratorProposal(ByteGAN(), output_range=(0, 255))
    images = proposal.generate(proposal.p_z().sample(4))
    assert images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="output_range must be"):
        GeneratorProposal(ByteGAN(), output_range=(1, 1))


def test_nan_heads_are_named_at_once_not_after_the_budget(saved, tmp_path, capsys):
    rounds = []
    for head in ("dv_head", "dr_head"):
        pipe = gan_pipeline()
        with torch.no_grad():
            getattr(pipe.heads, head).weight.fill_(math.nan)
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"The heads' D_{head[1]} \(S2MHeads\.d{head[1]}_\w+\) returned NaN"):
            pipe("A", callback_on_step_end=lambda *a: rounds.append(1), **KWARGS)
        assert time.perf_counter() - start < 5 and rounds == []  # on the first micro-batch
    folder = tmp_path / "nan"
    pipe.save_pretrained(folder)
    assert sample(folder, tmp_path / "out") == 2
    assert "D_r" in error_of(capsys) and not (tmp_path / "out").exists()


def test_a_nan_generator_and_nan_latents_are_named():
    gan = dcgan()
    with torch.no_grad():
        next(gan.parameters()).fill_(math.nan)
    pipe = S2MPipeline(heads=gan_pipeline().heads, gan=gan)
    with pytest.raises(ValueError, match=r"DCGANGenerator \(GeneratorProposal\) returned images with NaN"):
        pipe("A", **KWARGS)
    proposal = GeneratorProposal(dcgan())
    z = proposal.p_z().sample(3)
    z[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"1 of the 3 latents given to DCGANGenerator \(GeneratorProposal\)"):
        proposal.generate(z)


# ---------------------------------------------------------------------------------------------------------------
# 6: resuming from a checkpoint of another configuration


def test_resuming_from_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    settings = {**SMALL, "num_steps": 1, "eval_steps": 1, "output_dir": tmp_path, "checkpointing_steps": 1}
    train_heads(_data(), CountingProposal(), **settings)
    resume = {**settings, "num_steps": 2, "resume_from_checkpoint": "latest"}
    with pytest.raises(ValueError, match=r"heads\.cnn_channels: \[8\] in the checkpoint, \[4\] now"):
        train_heads(_data(), CountingProposal(), **{**resume, "cnn_channels": [4]})
    renamed = _data()
    renamed.attribute_names = ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"heads\.attribute_names: \['a', 'b', 'c'\] in the checkpoint"):
        train_heads(renamed, CountingProposal(), **resume)
    with pytest.raises(ValueError, match=r"training\.batch_size: 8 in the checkpoint, 4 now"):
        train_heads(_data(), CountingProposal(), **{**resume, "batch_size": 4})
    heads, metrics = train_heads(_data(), CountingProposal(), **resume)  # the same configuration resumes
    assert metrics["steps"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 10, 11: targets, and the messages of the interface called


def test_deep_and_long_targets_are_bounded(saved, tmp_path, capsys):
    names = ["A", "B", "C"]
    for text in ("(" * 400 + "A" + ")" * 400, "~" * 400 + "A"):
        with pytest.raises(TargetError, match=f"More than {MAX_NESTING} parentheses and negations"):
            parse_target(text, names)
        assert sample(saved, tmp_path / "out", target=text) == 2
        assert "fewer levels" in error_of(capsys)
    assert str(parse_target("(" * MAX_NESTING + "A" + ")" * MAX_NESTING, names)) == "A"
    start = time.perf_counter()
    long = parse_target(" & ".join(["A"] * 2500), names)  # 10,000 characters
    assert str(long) == "A" and len(long.stages()) == 1 and time.perf_counter() - start < 2
    repeated = parse_target(" & ".join(["(A | B)", "(B | A)", "(A | C)", "(C | A)", "(B | C)", "~C", "~C"]), names)
    assert len(repeated.stages()) <= 3  # at most one per attribute


def test_cli_messages_use_the_cli_words_and_say_only_what_applies(saved, tmp_path, capsys):
    assert sample(saved, tmp_path / "o", "--max-proposals", "2") == 1
    err = error_of(capsys)
    assert "--max-proposals 8" in err and "Of the entry pool's 2 draws" in err
    assert "max_proposals=" not in err and "allow_partial" not in err and "refit" not in err
    assert "--allow-partial" not in err  # no image was found: nothing to keep
    assert sample(saved, tmp_path / "o", target="a & ~B") == 2
    assert "Did you mean 'A'?" in error_of(capsys)
    for text in ("A &", "(A", "A && B"):
        assert sample(saved, tmp_path / "o", target=text) == 2
        assert "train heads" not in error_of(capsys)  # a syntax error is not about other attributes
    assert sample(saved, tmp_path / "o", target="Z") == 2
    assert "train heads on single-positive data" in error_of(capsys)  # an unknown attribute is
    assert sample(saved, tmp_path / "o", "--presence-margin", "2") == 2
    assert "--presence-margin must lie in [0, 1]" in error_of(capsys)


def test_an_unexpected_error_is_one_line_with_status_3(saved, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the device fell off")

    monkeypatch.setattr(S2MPipeline, "__call__", broken)
    assert sample(saved, tmp_path / "o") == 3
    assert "RuntimeError: the device fell off" in error_of(capsys)
    monkeypatch.setenv("S2M_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        sample(saved, tmp_path / "o")


# ---------------------------------------------------------------------------------------------------------------
# 12: too little data


def write_folders(root, counts):
    for name, n in counts.items():
        os.makedirs(root / name)
        for i in range(n):
            Image.new("L", (8, 8), 30 * i + (100 if name == "a" else 0)).save(root / name / f"{i}.png")


def test_too_few_images_per_attribute_are_named(tmp_path, capsys):
    data = SinglePositiveDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 1, 2]), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"at least 2 images.*fewer: 'a' \(1\), 'c' \(1\)"):
        data.split(0.2)
    train, heldout = SinglePositiveDataset(torch.zeros(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2]), "abc").split(0.9)
    assert train.label_counts == [1, 1, 1] and heldout.label_counts == [1, 1, 1]  # each attribute on both sides
    gan = tmp_path / "gan"
    DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4).save_pretrained(gan)
    write_folders(tmp_path / "data", {"a": 1, "b": 3, "c": 1})
    args = ["train-heads", "--generator", str(gan), "--data-dir", str(tmp_path / "data"), "--output"]
    args += [str(tmp_path / "out"), "--num-steps", "1", "--batch-size", "4", "--num-heldout-samples", "8", "--quiet"]
    assert main(args) == 2
    assert "'a' (1), 'c' (1)" in error_of(capsys) and not (tmp_path / "out").exists()
    assert main([*args, "--heldout-fraction", "1.5"]) == 2 and "--heldout-fraction" in error_of(capsys)


def test_train_heads_writes_the_pipeline_and_its_metrics_as_one_folder(tmp_path, capsys):
    gan = tmp_path / "gan"
    DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4).save_pretrained(gan)
    write_folders(tmp_path / "data", {"a": 3, "b": 3})
    out = tmp_path / "out"
    args = ["train-heads", "--generator", str(gan), "--data-dir", str(tmp_path / "data"), "--output", str(out)]
    args += ["--num-steps", "1", "--batch-size", "4", "--num-heldout-samples", "8", "--priors", "none", "--quiet"]
    assert main([*args, "--heldout-fraction", "0.5"]) == 0
    assert "metrics.json" in json.loads((out / hub.MANIFEST_FILE).read_text())["files"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete and consistent: no warning either
        S2MPipeline.from_pretrained(out)
    not_a_pipeline = tmp_path / "notes"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "thesis.tex").write_text("mine")
    capsys.readouterr()
    assert main([*args[:5], "--output", str(not_a_pipeline), *args[7:]]) == 2  # refused before training
    assert "no saved pipeline" in error_of(capsys)


# ---------------------------------------------------------------------------------------------------------------
# Passing before, kept: each through the command too


@pytest.mark.parametrize(
    "target, message",
    [
        ("Z", "Unknown attribute 'Z'"),
        ("A & ~A", "both requires and forbids"),
        ("", "empty"),
        ("A &", "Unexpected end"),
        ("A && B", "Expected an attribute name"),
        ("(A", "Missing ')'"),
        ("~A & ~B & ~C", "can never hold"),
    ],
)
def test_target_errors_through_the_command(saved, tmp_path, capsys, target, message):
    assert sample(saved, tmp_path / "o", target=target) == 2
    assert message in error_of(capsys) and not (tmp_path / "o").exists()


def test_other_inputs_through_the_command(saved, tmp_path, capsys):
    args = ["sample", "--pipeline", str(saved), "--target", "A", "--output", str(tmp_path / "o")]
    assert main([*args, "--num-images", "0"]) == 2
    assert "--num-images must be at least 1" in error_of(capsys)
    truncated = copy_of(saved, tmp_path)
    weights = truncated / "heads" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert sample(truncated, tmp_path / "o") == 2 and "could not load the pipeline" in error_of(capsys)
    save_file({"x": torch.zeros(1)}, tmp_path / "unused.safetensors")  # (safetensors itself is fine)


# ---------------------------------------------------------------------------------------------------------------
# Second round (issue 29). Item 1, two writers at once: `test_races.py`.
# 2: a folder copied without its `.py` files names them, not the classes


def test_a_folder_copied_without_its_py_files_names_the_missing_files(saved, tmp_path, capsys):
    folder = copy_of(saved, tmp_path)
    for shim in folder.rglob("*.py"):
        shim.unlink()
    message = r"lists files that are missing: gan/s2m_diffusers_models_gan\.py, heads/s2m_diffusers_models_heads\.py"
    with pytest.raises(ValueError, match=message + r", pipeline\.py\. The \.py files are one-line shims"):
        S2MPipeline.from_pretrained(folder)
    assert sample(folder, tmp_path / "out") == 2
    err = error_of(capsys)
    assert "pipeline.py" in err and "Copy or download the whole folder again" in err and "Install" not in err
    # without a manifest (diffusers' own layout, older saves) the index's shim is named too
    (folder / hub.MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match=r"class 'S2MPipeline' through pipeline\.py, which is missing"):
        S2MPipeline.from_pretrained(folder)
    (folder / "pipeline.py").write_text((saved / "pipeline.py").read_text())
    with pytest.raises(ValueError, match=r"'DCGANGenerator' through gan/s2m_diffusers_models_gan\.py, which is miss"):
        S2MPipeline.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# 5: an edited model_index.json: not an object, or a setting of the wrong type, named with the file and the key


@pytest.mark.parametrize(
    "content, message",
    [
        ([], r"model_index\.json holds a JSON list \(\[\]\), not an object"),
        (3, r"model_index\.json holds a JSON number \(3\), not an object"),
        ({"num_inference_steps": "ten"}, r"model_index\.json: the setting 'num_inference_steps' is \"ten\" \(a str"),
        ({"num_inference_steps": 0}, r"'num_inference_steps' is 0 \(a number\); it must be a positive integer"),
        ({"latent_shape": "abc"}, r"'latent_shape' is \"abc\" \(a string\); it must be null or a list of positive"),
        ({"proposal_kwargs": [1]}, r"'proposal_kwargs' is \[1\] \(a list\); it must be null or an object"),
        ({"default_target": 5}, r"'default_target' is 5 \(a number\); it must be null or a string"),
        ({"heads": "S2MHeads"}, r"the component 'heads' is \"S2MHeads\"; a component entry is \[\"library\""),
    ],
    ids=["list", "number", "steps-text", "steps-zero", "latent-shape", "proposal-kwargs", "default-target", "heads"],
)
def test_an_edited_index_names_the_file_the_setting_and_the_value(saved, tmp_path, capsys, content, message):
    folder = copy_of(saved, tmp_path)
    if isinstance(content, dict):
        edit_index(folder, **content)
    else:
        (folder / "model_index.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        S2MPipeline.from_pretrained(folder)
    assert sample(folder, tmp_path / "out") == 2
    err = error_of(capsys)
    assert str(folder / "model_index.json") in err and "unexpected error" not in err


def test_saving_over_a_folder_whose_index_is_not_an_object_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "model_index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"no readable model_index\.json: a JSON list, not an object"):
        gan_pipeline().save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# 4: sizes nobody can serve are refused before any work; `s2m sample` writes many images call by call


@pytest.fixture
def memory_available(monkeypatch):
    """Set the memory the machine has, as `s2m_diffusers.memory` reads it: ``memory_available(bytes, source)``."""
    from s2m_diffusers import memory

    def available(n: int, source: str) -> None:
        monkeypatch.setattr(memory, "available_memory", lambda: (n, source))

    available(2**30, "a test's 1 GiB")
    return available


def test_a_call_that_cannot_fit_in_memory_is_refused_before_any_work(memory_available):
    pipe = gan_pipeline()
    calls = []
    pipe.gan.register_forward_hook(lambda *args: calls.append(1))
    start = time.perf_counter()
    cheap = dict(max_proposals=10, **FAST)  # were the check to let them through, they would stop at once
    memory_available(2**20, "a test's 1 MiB")
    with pytest.raises(ValueError, match=r"num_images=100000 would hold at least 33\.7 MiB in memory"):
        pipe("A", num_images=10**5, **cheap)
    memory_available(2**30, "a test's 1 GiB")  # and counts that no machine holds, without allocating them
    with pytest.raises(ValueError, match=r"num_images=1000000000 would hold at least 327\.8 GiB in memory") as err:
        pipe("A", num_images=10**9, **cheap)
    assert "but 1.0 GiB is available (a test's 1 GiB)" in str(err.value) and "at most about 3" in str(err.value)
    with pytest.raises(ValueError, match=r"num_chains=2000000 would hold .* 2000000 chains: 1\.2 GiB; the entry pool"):
        pipe("A", num_images=2 * 10**6, num_chains=2 * 10**6, **cheap)
    assert calls == [] and time.perf_counter() - start < 1  # nothing generated, nothing allocated
    from s2m_diffusers.memory import check_call_memory

    assert check_call_memory(pipe, 10**9, None, "pil", available=(None, "unknown"))["needed"] > 2**38  # unknown: run


def test_the_memory_estimate_counts_the_entry_pools_on_target_images():
    """The pool holds at least one on-target image (and latent) per pair of chains, up to `chains.MAX_ON_TARGET`."""
    from s2m_diffusers.chains import MAX_ON_TARGET
    from s2m_diffusers.memory import call_memory

    one = (3 * 8 * 8 + 10) * 4  # an image of 3x8x8 and a latent of 10 values, as float32
    assert call_memory(64, 16, (3, 8, 8), 10)["pool"] == 8 * one
    assert call_memory(10**6, 10**4, (3, 8, 8), 10)["pool"] == MAX_ON_TARGET * one
    assert call_memory(1, 1, (3, 8, 8), 10)["pool"] == one


def test_sample_refuses_counts_it_cannot_hold_naming_the_option(saved, tmp_path, capsys, memory_available):
    memory_available(2**20, "a test's 1 MiB")
    assert sample(saved, tmp_path / "out", "--num-images", "100000", "--max-proposals", "10") == 2
    assert "--num-images 100000 needs at least 15.8 MiB" in error_of(capsys) and not (tmp_path / "out").exists()
    memory_available(2**30, "a test's 1 GiB")
    for extra, option in [
        (["--num-images", "1000000000"], "--num-images 1000000000 needs at least"),
        (["--num-images", "1000000000", "--num-chains", "1000000000"], "--num-images 1000000000 needs at least"),
        (["--num-images", "5000000", "--images-per-call", "5000000"], "--images-per-call 5000000 needs at least"),
    ]:
        assert sample(saved, tmp_path / "out", *extra) == 2
        err = error_of(capsys)
        assert option in err and "is available (a test's 1 GiB)" in err and "unexpected" not in err
        assert not (tmp_path / "out").exists()


def test_sample_writes_many_images_call_by_call_and_moves_the_folder_whole(saved, tmp_path, monkeypatch):
    """`--images-per-call 2` for 5 images: 3 calls, each call's images written into the hidden staging folder before
    the next call (memory does not grow with --num-images), the folder appearing whole at the end."""
    from safetensors.torch import load_file

    from s2m_diffusers.evaluation import check_sample_folder

    staged = []
    call = S2MPipeline.__call__

    def counting(self, *args, **kwargs):
        (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        staged.append((kwargs["num_images"], len(list(staging.glob("*.png"))), (tmp_path / "out").exists()))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(S2MPipeline, "__call__", counting)
    assert sample(saved, tmp_path / "out", "--num-images", "5", "--images-per-call", "2") == 0
    assert staged == [(2, 0, False), (2, 2, False), (1, 4, False)]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["calls"] == 3 and stats["images_per_call"] == 2 and stats["num_images"] == 5
    assert stats["proposals_per_image"] * 5 == pytest.approx(stats["proposals"]) and len(stats["on_target"]) == 5
    assert len(check_sample_folder(str(tmp_path / "out"))) == 5  # complete: `s2m evaluate` takes it
    latents = load_file(str(tmp_path / "out" / "latents.safetensors"))["latents"]
    assert latents.shape == (5, 8) and latents.dtype == torch.float32
    # the first call is the run of its seed alone: the same images and latents
    monkeypatch.setattr(S2MPipeline, "__call__", call)
    assert sample(saved, tmp_path / "two", "--num-images", "2") == 0
    for name in ("0000.png", "0001.png"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert torch.equal(load_file(str(tmp_path / "two" / "latents.safetensors"))["latents"], latents[:2])
    assert not (tmp_path / "out" / "0002.png").read_bytes() == (tmp_path / "out" / "0000.png").read_bytes()
