from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.utils import save_pretrained_atomically


def test_save_pretrained_atomically_replaces_the_folder(tmp_path):
    out = tmp_path / "gan"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    model = DCGANGenerator(latent_dim=4, sample_size=16, out_channels=1, base_channels=4)
    save_pretrained_atomically(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]
    assert DCGANGenerator.from_pretrained(out).config.latent_dim == 4


def test_write_json_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    import json

    from s2m_diffusers.utils import write_json_atomically

    path = tmp_path / "rows.json"
    path.write_text("old")
    write_json_atomically(path, [{"accuracy": 0.5}])
    assert json.loads(path.read_text()) == [{"accuracy": 0.5}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
