"""`s2m evaluate` with a transformers image-classification model and a mapping of its labels to attribute sets.

The classifiers are tiny, randomly initialised ViT and ResNet models built from configs and saved to `tmp_path`
(nothing comes from the Hub); the accuracy is checked against the one computed by hand from the model's own logits.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from s2m_diffusers.cli import main
from s2m_diffusers.data import load_image_folder
from s2m_diffusers.evaluation import TransformersEvaluator, evaluator_class_probs, load_evaluator

transformers = pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LABELS = ["smiling_man", "smiling_woman", "neutral_man", "neutral_woman"]
MAPPING = {
    "smiling_man": ["smiling", "male"],
    "smiling_woman": ["smiling"],
    "neutral_man": ["male"],
    "neutral_woman": [],
}
TARGET = "smiling & ~male"  # only smiling_woman satisfies it
IN_TARGET = [False, True, False, False]


def _vit(folder, processor: bool = True):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    if processor:  # mean 0.3, std 0.2: not the [-1, 1] convention, so that a missed normalisation would show
        transformers.ViTImageProcessor(
            size={"height": 16, "width": 16}, image_mean=[0.3] * 3, image_std=[0.2] * 3
        ).save_pretrained(folder)
    return str(folder)


def _images(folder, n: int = 12, size: int = 12):
    """`n` random RGB images of `size` pixels (the processor resizes them to the model's 16)."""
    os.makedirs(folder)
    pixels = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


def _by_hand(model_dir, images_dir) -> torch.Tensor:
    """P(target) per image from the model's own logits on its processor's input (the files, read as PIL images)."""
    model = transformers.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    files = sorted(os.listdir(images_dir))
    pil = [Image.open(os.path.join(images_dir, name)).convert("RGB") for name in files]
    with torch.no_grad():
        logits = model(**processor(images=pil, return_tensors="pt")).logits  # (N, 4)
    return logits.softmax(dim=1)[:, torch.tensor(IN_TARGET)].sum(dim=1)  # (N,)


def _evaluate(images_dir, model_dir, out, *extra, target=TARGET, mapping=MAPPING):
    args = ["evaluate", "--images", images_dir, "--target", target, "--evaluator", model_dir, "--output", str(out)]
    if mapping is not None:
        args += ["--label_attributes", mapping if isinstance(mapping, str) else json.dumps(mapping)]
    return main([*args, *extra])


def test_accuracy_is_the_classifiers_summed_label_probability(tmp_path, capsys):
    model_dir, images_dir = _vit(tmp_path / "vit"), _images(tmp_path / "samples")
    p_target = _by_hand(model_dir, images_dir)
    # a threshold between two of the images' probabilities: about half of them on target
    ordered = p_target.sort().values
    threshold = float(ordered[5] + ordered[6]) / 2
    expected = float((p_target > threshold).float().mean())
    assert 0 < expected < 1

    out = tmp_path / "report.json"
    assert _evaluate(images_dir, model_dir, out, "--threshold", str(threshold)) == 0
    result = json.loads(out.read_text())
    assert result["accuracy"] == pytest.approx(expected) and result["num_images"] == 12
    assert result["label_attributes"] == MAPPING
    assert "accuracy" in capsys.readouterr().out

    # the mapping from a JSON file, and the probabilities themselves
    mapping_file = tmp_path / "labels.json"
    mapping_file.write_text(json.dumps(MAPPING))
    assert _evaluate(images_dir, model_dir, out, "--threshold", str(threshold), mapping=str(mapping_file)) == 0
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(expected)
    evaluator = load_evaluator(model_dir, MAPPING)
    assert isinstance(evaluator, TransformersEvaluator) and evaluator.config.attribute_names == ["smiling", "male"]
    probs = evaluator_class_probs(evaluator, load_image_folder(images_dir, 12, 3))[:, torch.tensor(IN_TARGET)]
    assert torch.allclose(probs.sum(dim=1), p_target, atol=1e-6)


def test_reference_images_give_a_frechet_distance_from_the_classifiers_features(tmp_path):
    model_dir, images_dir = _vit(tmp_path / "vit"), _images(tmp_path / "samples")
    reference = _images(tmp_path / "reference", n=6, size=20)
    out = tmp_path / "report.json"
    assert _evaluate(images_dir, model_dir, out, "--reference", reference) == 0
    result = json.loads(out.read_text())
    assert result["num_reference"] == 6 and result["frechet_distance"] >= 0.0


def test_a_classifier_without_processor_sees_images_in_minus_one_one_at_its_size(tmp_path):
    model_dir, images_dir = _vit(tmp_path / "vit", processor=False), _images(tmp_path / "samples")
    model = transformers.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(pixel_values=load_image_folder(images_dir, 16, 3)).logits
    p_target = logits.softmax(dim=1)[:, torch.tensor(IN_TARGET)].sum(dim=1)
    threshold = float(p_target.median())
    out = tmp_path / "report.json"
    assert _evaluate(images_dir, model_dir, out, "--threshold", str(threshold)) == 0
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(float((p_target > threshold).float().mean()))


def test_a_resnet_classifier_from_a_config(tmp_path):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], id2label=dict(enumerate(LABELS))
    )
    folder = tmp_path / "resnet"
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    images_dir = _images(tmp_path / "samples")
    # no processor and no image_size in its config: the input size is unknown
    assert _evaluate(images_dir, str(folder), tmp_path / "r.json") == 2
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    assert _evaluate(images_dir, str(folder), tmp_path / "r.json", "--reference", images_dir) == 0
    assert 0.0 <= json.loads((tmp_path / "r.json").read_text())["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "mapping, target, message",
    [
        (None, TARGET, "--label_attributes"),  # no mapping: the labels are listed
        ({k: v for k, v in MAPPING.items() if k != "neutral_woman"}, TARGET, "no attribute set for the label(s)"),
        ({**MAPPING, "frowning": ["sad"]}, TARGET, "not labels of the model"),
        ({**MAPPING, "smiling_man": "smiling"}, TARGET, "must be a list of attribute names"),
        ({**MAPPING, "smiling_man": ["smiling man"]}, TARGET, "attribute names are letters"),
        (MAPPING, "smiling & ~glasses", "glasses"),  # an attribute no label has
        ("{not json", TARGET, "neither a JSON file nor JSON text"),
        ('["smiling"]', TARGET, "must be a JSON object"),
    ],
)
def test_mapping_problems_are_named(tmp_path, capsys, mapping, target, message):
    model_dir, images_dir = _vit(tmp_path / "vit"), _images(tmp_path / "samples", n=2)
    assert _evaluate(images_dir, model_dir, tmp_path / "r.json", target=target, mapping=mapping) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if mapping is None:
        assert "smiling_man" in err


def test_a_missing_transformers_names_the_extra(tmp_path, capsys, monkeypatch):
    model_dir, images_dir = _vit(tmp_path / "vit"), _images(tmp_path / "samples", n=2)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    assert _evaluate(images_dir, model_dir, tmp_path / "r.json") == 2
    assert "s2m-diffusers[transformers]" in capsys.readouterr().err


def test_a_model_that_is_no_image_classifier_is_refused(tmp_path, capsys):
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    images_dir = _images(tmp_path / "samples", n=2)
    assert _evaluate(images_dir, str(tmp_path / "bert"), tmp_path / "r.json", mapping={"LABEL_0": ["a"]}) == 2
    assert "not a transformers image-classification model" in capsys.readouterr().err
