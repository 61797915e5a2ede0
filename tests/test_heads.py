import json
import os
import subprocess
import sys

import pytest
import torch

from s2m_diffusers.data import SinglePositiveDataset
from s2m_diffusers.models.heads import S2MHeads, S2MHeadsOutput
from s2m_diffusers.training import train_heads

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_VIT = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 1,
}
TINY_CONVNEXT = {
    "model_type": "convnext",
    "num_stages": 2,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "patch_size": 2,
    "num_channels": 3,
    "image_size": 32,
}


def _images(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _data(n: int = 48, size: int = 16) -> SinglePositiveDataset:
    images = _images(n, size)
    labels = torch.arange(n) % 3
    images[:, :, :4, :4] = (labels.float() - 1).view(-1, 1, 1, 1)  # a visible label mark
    return SinglePositiveDataset(images, labels, ["a", "b", "c"])


def _proposal(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=generator) * 1.6 - 0.8


def test_forward_shapes_and_calibrated_outputs():
    heads = S2MHeads(attribute_names=["a", "b", "c"], sample_size=16, in_channels=1, cnn_channels=[8, 16]).eval()
    x = _images(5)
    out = heads(x)
    assert isinstance(out, S2MHeadsOutput)
    assert out.dv_logit.shape == (5,) and out.dr_log_probs.shape == (5, 3) and out.df_log_probs is None
    torch.testing.assert_close(out.dr_log_probs.exp().sum(-1), torch.ones(5))
    raw = heads.raw_logits(x)
    heads.set_temperatures(dv=2.0, dr=0.5)
    out2 = heads(x)
    torch.testing.assert_close(out2.dv_logit, raw["dv"] / 2.0)
    torch.testing.assert_close(out2.dr_log_probs, torch.log_softmax(raw["dr"] / 0.5, -1))
    assert heads.temperatures() == {"dv": 2.0, "dr": 0.5}


def test_conditional_heads_have_df_and_separate_backbones():
    heads = S2MHeads(attribute_names=["a", "b"], sample_size=16, in_channels=1, conditional=True, cnn_channels=[8])
    assert sorted(heads.backbones) == ["df", "dr", "dv"]
    out = heads(_images(3))
    assert out.df_log_probs.shape == (3, 2)
    shared = S2MHeads(
        attribute_names=["a", "b"], sample_size=16, in_channels=1, shared_backbone=True, cnn_channels=[8]
    )
    assert list(shared.backbones) == ["shared"]
    assert torch.allclose(heads.log_proposal_class_probs().exp(), torch.full((2,), 0.5))


def test_wrong_input_shape_is_an_error():
    heads = S2MHeads(attribute_names=["a", "b"], sample_size=16, in_channels=1, cnn_channels=[8])
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        heads(_images(2, size=8))


@pytest.mark.parametrize(
    "names, match",
    [
        (["a"], "at least 2"),
        (["a", "a", "b"], "Duplicate"),
        (["a b", "c"], "not allowed"),
        (["a&b", "c"], "not allowed"),
    ],
)
def test_bad_attribute_names(names, match):
    with pytest.raises(ValueError, match=match):
        S2MHeads(attribute_names=names, sample_size=16, in_channels=1)


def test_config_views():
    heads = S2MHeads(
        attribute_names=["a", "b"],
        sample_size=16,
        in_channels=1,
        label_counts=[1, 3],
        priors=[0.5, 0.5],
        cnn_channels=[8],
    )
    torch.testing.assert_close(heads.log_p_data().exp(), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(heads.log_priors().exp(), torch.tensor([0.5, 0.5]))
    assert heads.negation_margin == 10.0 and heads.attribute_names == ["a", "b"] and not heads.conditional
    with pytest.raises(ValueError, match="label_counts"):
        S2MHeads(attribute_names=["a", "b"], label_counts=[1, 2, 3])


def readings(folders: list[str], images_path: str) -> list[dict]:
    """What the heads saved in each folder, loaded afresh, read on the images saved at ``images_path``."""
    from safetensors.torch import load_file

    x = load_file(images_path)["x"]
    out = []
    for folder in folders:
        heads = S2MHeads.from_pretrained(folder).eval()
        with torch.no_grad():
            read = heads(x)
        out.append(
            {"dv": read.dv_logit.tolist(), "dr": read.dr_log_probs.tolist(), "priors": heads.priors}
            | {"counts": heads.label_counts}
        )
    return out


def _reload_in_fresh_process(folders: list[str], images_path: str) -> list[dict]:
    code = "import json, sys; sys.path.insert(0, sys.argv[1]); from test_heads import readings\n"
    code += "for reading in readings(sys.argv[3:], sys.argv[2]):\n    print(json.dumps(reading))\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(__file__), images_path, *folders],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()[-len(folders) :]]


def train_cnn_and_vit(tmp_path) -> tuple[list, list[str], str]:
    """CNN and ViT heads trained for 3 steps and saved: (each one's heads and output on 4 images, their folders, the
    images' file)."""
    from safetensors.torch import save_file

    x = _images(4, seed=1)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    outputs, folders = [], []
    for backbone, kwargs in (("cnn", {"cnn_channels": [8, 16]}), ("vit", {"transformers_config": TINY_VIT})):
        heads, metrics = train_heads(
            _data(),
            _proposal,
            num_steps=3,
            batch_size=8,
            eval_steps=3,
            num_heldout_samples=16,
            progress=False,
            **kwargs,
        )
        assert metrics["steps"] == 3 and heads.label_counts == [16, 16, 16] and heads.priors is not None
        assert heads.temperatures()["dv"] == pytest.approx(metrics["dv_temperature"])
        heads.save_pretrained(tmp_path / backbone)
        assert (tmp_path / backbone / "diffusion_pytorch_model.safetensors").exists()
        outputs.append((heads, heads.eval()(x)))
        folders.append(str(tmp_path / backbone))
    return outputs, folders, str(tmp_path / "x.safetensors")


def check_round_trip(outputs: list, reloaded: list[dict]) -> None:
    for (heads, out), again in zip(outputs, reloaded, strict=True):
        torch.testing.assert_close(torch.tensor(again["dv"]), out.dv_logit, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(again["dr"]), out.dr_log_probs, rtol=0, atol=1e-6)
        assert again["priors"] == pytest.approx(heads.priors) and again["counts"] == [16, 16, 16]


def test_cnn_and_vit_train_few_steps_and_round_trip(tmp_path):
    outputs, folders, images_path = train_cnn_and_vit(tmp_path)
    check_round_trip(outputs, readings(folders, images_path))


@pytest.mark.slow  # a fresh interpreter
def test_cnn_and_vit_round_trip_in_a_fresh_process(tmp_path):
    outputs, folders, images_path = train_cnn_and_vit(tmp_path)
    check_round_trip(outputs, _reload_in_fresh_process(folders, images_path))


def test_convnext_backbone_resizes_and_normalises(tmp_path):
    heads = S2MHeads(
        attribute_names=["a", "b"],
        sample_size=16,
        in_channels=1,
        transformers_config=TINY_CONVNEXT,
        backbone_image_mean=[0.5, 0.5, 0.5],
        backbone_image_std=[0.25, 0.25, 0.25],
        shared_backbone=True,
    ).eval()
    x = _images(2)
    prepared = heads.backbone_inputs(x)
    assert prepared.shape == (2, 3, 32, 32)
    torch.testing.assert_close(prepared.mean(), ((x + 1) / 2 - 0.5).mean() / 0.25, atol=0.05, rtol=0)
    heads.save_pretrained(tmp_path)
    reloaded = S2MHeads.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(x).dr_log_probs, heads(x).dr_log_probs)


def test_local_transformers_checkpoint_is_embedded(tmp_path):
    from transformers import AutoConfig, AutoModel

    config = dict(TINY_VIT)
    model = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    model.save_pretrained(tmp_path / "vit")
    heads = S2MHeads(
        attribute_names=["a", "b"], sample_size=16, in_channels=1, transformers_checkpoint=str(tmp_path / "vit")
    )
    assert heads.config.transformers_checkpoint is None and heads.config.transformers_config["model_type"] == "vit"
    torch.testing.assert_close(
        heads.backbones["dr"].model.embeddings.patch_embeddings.projection.weight,
        model.embeddings.patch_embeddings.projection.weight,
    )
    heads.save_pretrained(tmp_path / "heads")
    reloaded = S2MHeads.from_pretrained(tmp_path / "heads")
    torch.testing.assert_close(
        reloaded.backbones["dr"].model.embeddings.patch_embeddings.projection.weight,
        model.embeddings.patch_embeddings.projection.weight,
    )
    frozen = S2MHeads(
        attribute_names=["a", "b"],
        sample_size=16,
        in_channels=1,
        transformers_checkpoint=str(tmp_path / "vit"),
        freeze_backbone=True,
    )
    assert not any(p.requires_grad for p in frozen.backbones.parameters())
    assert all(p.requires_grad for p in frozen.dr_head.parameters())
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        S2MHeads(attribute_names=["a", "b"], transformers_checkpoint=str(tmp_path / "missing"))
