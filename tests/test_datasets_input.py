"""`s2m train-heads --dataset_name`: a `datasets` dataset as training data (saved with `save_to_disk`, or a local
folder that `datasets.load_dataset` reads), with ClassLabel or string labels; nothing is downloaded."""

import json
import os

import pytest
import torch
from PIL import Image

from s2m_diffusers.cli import main
from s2m_diffusers.data import SinglePositiveDataset, load_hf_dataset
from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.pipeline_s2m import S2MPipeline

datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def _images(n: int = 8) -> list[Image.Image]:
    return [Image.new("L", (8, 8), 40 * (i // 2) + 100 * (i % 2)) for i in range(n)]


def _dataset(labels: list) -> "datasets.Dataset":
    features = {"img": datasets.Image()}
    if isinstance(labels[0], int):
        features["attribute"] = datasets.ClassLabel(names=["a", "b"])
    else:
        features["attribute"] = datasets.Value("string")
    return datasets.Dataset.from_dict({"img": _images(len(labels)), "attribute": labels}, datasets.Features(features))


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gan") / "gan"
    torch.manual_seed(0)
    DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4).save_pretrained(folder)
    return str(folder)


def train_args(gan: str, dataset: str, output, *extra: str) -> list[str]:
    args = ["train-heads", "--pretrained_model_name_or_path", gan, "--dataset_name", dataset, "--output_dir"]
    args += [str(output), "--image_column", "img", "--label_column", "attribute", "--max_train_steps", "2"]
    return [*args, "--train_batch_size", "4", "--num_heldout_samples", "8", "--priors", "none", "--quiet", *extra]


def test_train_heads_from_a_dataset_saved_to_disk(gan, tmp_path, capsys):
    _dataset([0, 1] * 4).save_to_disk(tmp_path / "saved")
    out = tmp_path / "out"
    assert main(train_args(gan, str(tmp_path / "saved"), out)) == 0, capsys.readouterr().err
    pipe = S2MPipeline.from_pretrained(str(out))
    assert pipe.heads.attribute_names == ["a", "b"] and pipe.heads.config.label_counts == [4, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "saved (a datasets dataset" in metrics["data"]
    assert str(tmp_path) not in json.dumps(metrics)  # no local path is recorded


def test_train_heads_from_a_dataset_dict_with_string_labels(gan, tmp_path, capsys):
    # a DatasetDict: its train split is used; string labels are the attribute names
    splits = {"train": _dataset(["b", "c"] * 4), "test": _dataset(["b", "c"])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")
    assert main(train_args(gan, str(tmp_path / "saved"), tmp_path / "out")) == 0, capsys.readouterr().err
    assert S2MPipeline.from_pretrained(str(tmp_path / "out")).heads.attribute_names == ["b", "c"]


def test_load_hf_dataset_reads_a_local_folder_that_load_dataset_reads(tmp_path):
    _dataset([0, 1] * 4).to_parquet(str(tmp_path / "files" / "train.parquet"))
    dataset = load_hf_dataset(tmp_path / "files")
    data = SinglePositiveDataset.from_hf_dataset(dataset, 8, 1, "img", "attribute")
    assert data.attribute_names == ["a", "b"] and data.label_counts == [4, 4] and data.images.shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['train'\]"):
        load_hf_dataset(tmp_path / "files", split="validation")


def test_dataset_errors_name_the_flag_and_the_fix(gan, tmp_path, capsys):
    _dataset([0, 1] * 4).save_to_disk(tmp_path / "saved")
    args = train_args(gan, str(tmp_path / "saved"), tmp_path / "out")
    assert main([*args, "--label_column", "label"]) == 2
    err = capsys.readouterr().err
    assert "--label_column label: the dataset" in err and "its columns are ['img', 'attribute']" in err
    assert main([*args, "--dataset_config_name", "x"]) == 2
    assert "has no configurations" in capsys.readouterr().err
    data = ["--train_data_dir", str(tmp_path)]
    with pytest.raises(SystemExit):  # a folder or a dataset, not both
        main([*args, *data])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_missing_datasets_package_names_the_extra(gan, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    assert main(train_args(gan, str(tmp_path / "missing"), tmp_path / "out")) == 2
    assert "pip install 's2m-diffusers[datasets]'" in capsys.readouterr().err
