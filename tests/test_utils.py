import os
import stat

import torch
from torch import nn

from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.utils import module_device_dtype, save_folder_atomically, save_pretrained_atomically


def test_save_pretrained_atomically_replaces_the_folder(tmp_path):
    out = tmp_path / "gan"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    model = DCGANGenerator(latent_dim=4, sample_size=16, out_channels=1, base_channels=4)
    save_pretrained_atomically(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gan"]  # no staging folder left
    assert DCGANGenerator.from_pretrained(out).config.latent_dim == 4


def test_write_json_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    import json

    from s2m_diffusers.utils import write_json_atomically

    path = tmp_path / "rows.json"
    path.write_text("old")
    write_json_atomically(path, [{"accuracy": 0.5}])
    assert json.loads(path.read_text()) == [{"accuracy": 0.5}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


def test_save_folder_atomically_merges_into_an_existing_folder(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "sub" / "old.txt").write_text("old")

    def write(folder):
        os.makedirs(os.path.join(folder, "sub"))
        for name in ("model_index.json", "sub/new.txt"):
            with open(os.path.join(folder, name), "w") as f:
                f.write(name)

    assert save_folder_atomically(write, out) == str(out)
    # entries the writer wrote replace those of the same name (a folder as a whole); the others stay
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "model_index.json", "sub"]
    assert sorted(p.name for p in (out / "sub").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a new folder arrives by one rename, readable by all
    save_folder_atomically(write, tmp_path / "new")
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "model_index.json").st_mode) == 0o644


def test_module_device_dtype():
    gan = DCGANGenerator(latent_dim=4, sample_size=16, out_channels=1, base_channels=4).to(torch.float64)
    assert module_device_dtype(gan) == (torch.device("cpu"), torch.float64)  # ModelMixin's own device and dtype
    assert module_device_dtype(nn.Linear(2, 2).half()) == (torch.device("cpu"), torch.float16)
    assert module_device_dtype(nn.ReLU()) == (torch.device("cpu"), torch.float32)  # no parameters
