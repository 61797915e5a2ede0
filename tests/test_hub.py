"""Sharing: the saved layout passes diffusers' download-time check, the model card, the upload against a stand-in for
the Hub client, loading the uploaded repo from an offline Hub cache in a fresh process, and `diffusers-cli run`."""

import fnmatch
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders
from huggingface_hub import HfApi, ModelCard
from test_pipeline import FAST, gan_pipeline, seeded

from s2m_diffusers import hub
from s2m_diffusers.pipeline_s2m import S2MPipeline

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn
KWARGS = dict(num_images=2, negation_margin=1.0, output_type="pt", **FAST)


class StandInHub:
    """A stand-in for `huggingface_hub.HfApi`: records every call and serves what was uploaded as an offline
    Hugging Face cache (`models--user--name/{snapshots,refs,trees}`), where `from_pretrained` finds it."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.calls: list[tuple] = []
        self.files: dict[str, bytes] = {}

    @staticmethod
    def _check(name, args, kwargs):
        """Every call must be valid for the real `HfApi` method of that name."""
        inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs)

    def create_repo(self, *args, **kwargs):
        self._check("create_repo", args, kwargs)
        return self._create_repo(*args, **kwargs)

    def upload_folder(self, *args, **kwargs):
        self._check("upload_folder", args, kwargs)
        return self._upload_folder(*args, **kwargs)

    def upload_file(self, *args, **kwargs):
        self._check("upload_file", args, kwargs)
        return self._upload_file(*args, **kwargs)

    def _create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def _upload_folder(self, repo_id, folder_path, commit_message=None, create_pr=False, ignore_patterns=None, **kw):
        files = {}
        for path in Path(folder_path).rglob("*"):
            rel = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or []):
                files[rel] = path.read_bytes()
        self.calls.append(("upload_folder", repo_id, sorted(files), commit_message, create_pr))
        self.files.update(files)
        return self._commit(repo_id)

    def _upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message=None, revision=None, **kwargs):
        self.files[path_in_repo] = Path(path_or_fileobj).read_bytes()
        self.calls.append(("upload_file", repo_id, path_in_repo, self.files[path_in_repo].decode(), revision))
        return self._commit(repo_id)

    def _commit(self, repo_id):
        sha = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(self.files.items()))).hexdigest()
        storage = self.cache_dir / ("models--" + repo_id.replace("/", "--"))
        for rel, data in self.files.items():
            target = storage / "snapshots" / sha / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(sha)
        tree = {
            "format_version": 1,
            "files": {rel: {"size": len(d), "blob_id": hashlib.sha1(d).hexdigest()} for rel, d in self.files.items()},
        }
        (storage / "trees").mkdir(parents=True, exist_ok=True)
        (storage / "trees" / f"{sha}.json").write_text(json.dumps(tree))
        return SimpleNamespace(oid=sha, commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}", pr_revision=None)


def run_fresh(code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# Layout


def test_saved_layout_passes_diffusers_download_time_check(tmp_path):
    pipe = gan_pipeline()
    pipe.save_pretrained(tmp_path / "s2m")
    index = json.loads((tmp_path / "s2m" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "S2MPipeline"]
    assert index["heads"] == ["s2m_diffusers_models_heads", "S2MHeads"]
    assert index["gan"] == ["s2m_diffusers_models_gan", "DCGANGenerator"]
    assert (
        (tmp_path / "s2m" / "pipeline.py")
        .read_text()
        .endswith("from s2m_diffusers.pipeline_s2m import S2MPipeline  # noqa: F401\n")
    )
    shim = (tmp_path / "s2m" / "heads" / "s2m_diffusers_models_heads.py").read_text().splitlines()
    assert shim[1] == "from s2m_diffusers.models.heads import S2MHeads  # noqa: F401" and len(shim) == 2
    files = hub.custom_component_files(tmp_path / "s2m")
    assert "heads/diffusion_pytorch_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    custom, folders = _get_custom_components_and_folders("user/s2m-tiny", index, files)
    assert custom == {"heads": "s2m_diffusers_models_heads", "gan": "s2m_diffusers_models_gan"}
    # diffusers' own save layout fails that very check: the reason the shims exist
    DiffusionPipeline.save_pretrained(pipe, tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    with pytest.raises(
        ValueError, match=r"s2m_diffusers\.models\.\w+\.py as defined in `model_index.json` does not exist"
    ):
        _get_custom_components_and_folders("user/s2m-tiny", plain, hub.custom_component_files(tmp_path / "plain"))
    # ...and S2MPipeline still loads that plain layout too
    loaded = S2MPipeline.from_pretrained(tmp_path / "plain")
    assert type(loaded.heads).__name__ == "S2MHeads"


def test_shims_are_read_back_without_running_them(tmp_path):
    pipe = gan_pipeline()
    pipe.save_pretrained(tmp_path / "s2m")
    shim = tmp_path / "s2m" / "heads" / "s2m_diffusers_models_heads.py"
    shim.write_text(shim.read_text() + "raise SystemExit('a shim must never run')\n")
    hub.write_manifest(tmp_path / "s2m")  # the edited shim as saved: the manifest check passes, the shim never runs
    config = json.loads((tmp_path / "s2m" / "model_index.json").read_text())
    resolved = hub.resolve_remote_code_layout(config, tmp_path / "s2m")
    assert resolved["_class_name"] == "S2MPipeline"
    assert resolved["heads"] == ["s2m_diffusers.models.heads", "S2MHeads"]
    assert S2MPipeline.from_pretrained(tmp_path / "s2m").heads is not None
    # a file that is not our shim is left alone
    (tmp_path / "s2m" / "pipeline.py").write_text("from evil import S2MPipeline\n")
    assert hub.resolve_remote_code_layout(config, tmp_path / "s2m")["_class_name"] == ["pipeline", "S2MPipeline"]


def test_saving_into_an_existing_folder_keeps_other_files(tmp_path):
    pipe = gan_pipeline()
    target = tmp_path / "s2m"
    pipe.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    pipe.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2m"]
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    S2MPipeline.from_pretrained(target)


def test_a_save_the_disk_cannot_hold_says_so_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """Too little free space: a clear error before anything is written; the disk filling during the write: the same
    error, the temporaries removed. Either way the pipeline in place still loads."""
    import errno

    pipe = gan_pipeline()
    target = tmp_path / "s2m"
    pipe.save_pretrained(target)
    before = sorted(p.name for p in target.iterdir())
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=2**20))
    with pytest.raises(OSError, match=r"needs about [0-9,]+ MiB and .* has 1 MiB free. Free some space") as err:
        pipe.save_pretrained(target)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(shutil, "disk_usage", usage)

    def fills_the_disk(pipeline, folder, *args, **kwargs):
        (Path(folder) / "half.safetensors").write_bytes(b"0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub, "_write_pipeline_folder", fills_the_disk)
    with pytest.raises(
        OSError,
        match=r"Cannot save the S2MPipeline .*: the disk filled while it was written .*\(nothing was half-written\)",
    ):
        pipe.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2m"]  # no temporaries left
    S2MPipeline.from_pretrained(target)


def test_hub_functions_save_and_load_a_pipeline(tmp_path):
    """The module-level functions that `S2MPipeline`'s loaders delegate to, called directly."""
    pipe = gan_pipeline()
    with pytest.warns(UserWarning, match="safetensors anyway"):
        hub.save_pipeline(pipe, tmp_path / "pickle", safe_serialization=False)
    assert not [f for f in os.listdir(tmp_path / "pickle" / "heads") if f.endswith(".bin")]
    folder = hub.save_pipeline(pipe, tmp_path / "s2m", training_data="Digits, 7to3 split.")
    assert folder == str(tmp_path / "s2m")
    assert {"model_index.json", "pipeline.py", "README.md"} <= set(os.listdir(folder))
    assert "Digits, 7to3 split." in (tmp_path / "s2m" / "README.md").read_text()
    kwargs = {"revision": "main", "torch_dtype": torch.float32}
    assert hub.snapshot_path(tmp_path / "s2m", kwargs) == folder and "revision" in kwargs  # a folder: no download
    config = hub.resolve_local_config(DiffusionPipeline.load_config(folder), folder, S2MPipeline)
    assert config["_class_name"] == "S2MPipeline" and config["heads"] == ["s2m_diffusers.models.heads", "S2MHeads"]
    api = StandInHub(tmp_path / "cache")
    commit = hub.push_pipeline(pipe, "user/s2m-tiny", folder=folder, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder", "upload_file"]
    assert f'revision="{commit.oid}"' in api.calls[-1][3]


def test_load_generator_folder(tmp_path):
    from s2m_diffusers.models.gan import DCGANGenerator

    DCGANGenerator(latent_dim=4, sample_size=16, out_channels=1, base_channels=4).save_pretrained(tmp_path / "gan")
    kind, components = hub.load_generator_folder(str(tmp_path / "gan"))
    assert kind == "gan" and isinstance(components["gan"], DCGANGenerator) and not components["gan"].training
    assert hub.generator_image_shape(kind, components) == (16, 1)
    with pytest.raises(ValueError, match="neither model_index.json"):
        hub.load_generator_folder(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Model card


def test_model_card_lists_attributes_data_and_a_pinned_snippet():
    pipe = gan_pipeline(default_target="A & ~B")
    text = hub.model_card(pipe, "user/s2m-tiny", "0123abcd", training_data={"source": "Digits-7to3", "seed": 0})
    card = ModelCard(text)
    assert card.data.library_name == "diffusers" and "s2m-diffusers" in card.data.tags
    for fragment in [
        "| `A` | 10 | 0.1667 |",
        "| `C` | 30 | 0.5 |",
        "trained on 60 single-positive labelled images",
        "- source: Digits-7to3",
        'DiffusionPipeline.from_pretrained(\n    "user/s2m-tiny",\n    revision="0123abcd",',
        "trust_remote_code=True",
        'S2MPipeline.from_pretrained("user/s2m-tiny", revision="0123abcd")',
        "diffusers-cli run --model user/s2m-tiny --revision 0123abcd --trust-remote-code",
        "s2m sample --pipeline user/s2m-tiny --revision 0123abcd",
        'pipe("A & ~B", num_images=4',
        "negation margin lambda = 10",
        "DCGANGenerator",
    ]:
        assert fragment in text, fragment


def test_card_license_base_model_and_no_local_paths(tmp_path):
    """The license and the generator's Hub repo reach the card's metadata; local folders appear nowhere in a save."""
    pipe = gan_pipeline()
    pipe.gan.register_to_config(_name_or_path="user/dcgan-digits")  # as from_pretrained of a Hub repo records it
    card = ModelCard(hub.model_card(pipe, "user/s2m-tiny", license="apache-2.0"))
    assert card.data.license == "apache-2.0" and card.data.base_model == "user/dcgan-digits"
    assert ModelCard(hub.model_card(pipe, base_model="org/other")).data.base_model == "org/other"

    local = gan_pipeline()
    local.gan.save_pretrained(tmp_path / "gan")
    local.gan = type(local.gan).from_pretrained(tmp_path / "gan")  # _name_or_path: the local folder
    local.save_pretrained(tmp_path / "s2m", license="mit")
    saved = (tmp_path / "s2m").rglob("*")
    texts = [p.read_text() for p in saved if p.is_file() and p.suffix in (".json", ".md", ".py")]
    assert texts and not [t for t in texts if str(tmp_path) in t]
    card = ModelCard((tmp_path / "s2m" / "README.md").read_text())
    assert card.data.license == "mit" and card.data.base_model is None

    loaded = S2MPipeline.from_pretrained(tmp_path / "s2m")  # the card's metadata survives a load and a save
    loaded.save_pretrained(tmp_path / "again")
    assert ModelCard((tmp_path / "again" / "README.md").read_text()).data.license == "mit"


def test_card_snippets_call_with_the_given_settings_and_a_saved_card_keeps_them(tmp_path):
    pipe = gan_pipeline()
    sampling = {"negation_margin": 30.0, "presence_margin": 0.5, "kernel": "independent", "samples_per_chain": 1}
    text = hub.model_card(pipe, "user/s2m-tiny", sampling=sampling)
    for fragment in [
        'pipe("A & ~B", num_images=4, generator=torch.Generator().manual_seed(0), negation_margin=30.0, '
        "presence_margin=0.5, kernel='independent', samples_per_chain=1)",
        '"target": "A & ~B", "num_images": 4, "negation_margin": 30.0, "presence_margin": 0.5, '
        '"kernel": "independent"',
        "--negation-margin 30.0 --presence-margin 0.5 --kernel independent",
        "no option for samples_per_chain",
    ]:
        assert fragment in text, fragment
    pipe.save_pretrained(tmp_path / "s2m", sampling=sampling)
    loaded = S2MPipeline.from_pretrained(tmp_path / "s2m")
    loaded.save_pretrained(tmp_path / "again")  # the card keeps its settings through a load and a save
    assert "--kernel independent" in (tmp_path / "again" / "README.md").read_text()
    loaded.set_progress_bar_config(disable=True)
    out = loaded("A & ~B", num_images=2, generator=seeded(), **{**sampling, **FAST})  # the snippet's call runs
    assert out.stats["kernel"] == "independent" and out.on_target.all()


def test_a_card_setting_of_an_earlier_version_is_left_out_of_the_snippets():
    """A pipeline saved by an earlier version may carry settings that no longer exist (its card's `sampling`, kept
    through loads and saves): the snippets would fail with them, so they are left out, with a warning."""
    with pytest.warns(UserWarning, match=r"sampling settings \['fit_size', 'refit'\] no longer exist"):
        text = hub.model_card(
            gan_pipeline(), "user/s2m-tiny", sampling={"fit_size": 64, "refit": "off", "kernel": "pcn"}
        )
    assert "kernel='pcn'" in text and "fit_size" not in text and "refit" not in text


# ---------------------------------------------------------------------------------------------------------------
# Upload and load back from the Hub (a stand-in client, an offline cache)


def test_push_to_hub_uploads_the_layout_and_a_card_pinned_to_the_code_commit(tmp_path):
    pipe = gan_pipeline()
    api = StandInHub(tmp_path / "cache")
    commit = pipe.push_to_hub("user/s2m-tiny", private=True, api=api, training_data="Digits, 7to3 split.")
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "upload_folder", "upload_file"]
    assert api.calls[0] == ("create_repo", "user/s2m-tiny", True, True)
    uploaded = api.calls[1][2]
    for path in [
        "model_index.json",
        "pipeline.py",
        "heads/config.json",
        "heads/diffusion_pytorch_model.safetensors",
        "heads/s2m_diffusers_models_heads.py",
        "gan/s2m_diffusers_models_gan.py",
    ]:
        assert path in uploaded, path
    assert "README.md" not in uploaded  # the card comes second, pinned to this commit
    _, repo, path, readme, _ = api.calls[2]
    assert (repo, path) == ("user/s2m-tiny", "README.md")
    assert f'revision="{commit.oid}"' in readme and "Digits, 7to3 split." in readme


def push_tiny(tmp_path):
    """A tiny pipeline's images (seed 7) and the commit of its upload to a stand-in Hub cached in `tmp_path/cache`."""
    pipe = gan_pipeline()
    expected = pipe("A & ~B", generator=seeded(7), **KWARGS).images
    return expected, pipe.push_to_hub("user/s2m-tiny", api=StandInHub(tmp_path / "cache"))


def test_repo_uploaded_to_the_hub_loads_through_the_installed_package(tmp_path):
    expected, commit = push_tiny(tmp_path)
    loaded = S2MPipeline.from_pretrained("user/s2m-tiny", revision=commit.oid, cache_dir=tmp_path / "cache")
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(loaded("A & ~B", generator=seeded(7), **KWARGS).images, expected, atol=1e-5)


@pytest.mark.slow  # a fresh interpreter
def test_repo_uploaded_to_the_hub_loads_in_a_fresh_process(tmp_path):
    expected, commit = push_tiny(tmp_path)
    code = f"""
import sys, types, torch
import diffusers.pipelines.pipeline_utils as pipeline_utils
import diffusers.utils.dynamic_modules_utils as dynamic
from diffusers import DiffusionPipeline

check = pipeline_utils._get_custom_components_and_folders


def recorded(*args, **kwargs):  # the download-time check of custom components, observed
    custom, folders = check(*args, **kwargs)
    print("checked", sorted(custom))
    return custom, folders


pipeline_utils._get_custom_components_and_folders = recorded

# Offline, diffusers still asks the Hub API for the commit of the repo's code; the stand-in answers.
dynamic.model_info = lambda *args, **kwargs: types.SimpleNamespace(sha={commit.oid!r})
assert not any(m.startswith("s2m_diffusers") for m in sys.modules)
pipe = DiffusionPipeline.from_pretrained("user/s2m-tiny", revision={commit.oid!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
out = pipe("A & ~B", generator=torch.Generator().manual_seed(7), **{KWARGS!r})
torch.save(out.images, {str(tmp_path / "images.pt")!r})
print(type(pipe).__name__, pipe.name_or_path)
"""
    result = run_fresh(code, tmp_path, HF_HUB_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked ['gan', 'heads']" in result.stdout and "S2MPipeline user/s2m-tiny" in result.stdout
    assert torch.allclose(
        torch.load(tmp_path / "images.pt"), expected, atol=1e-5
    )  # float32 rounding of reloaded weights


def test_push_to_hub_goes_through_huggingface_hub_hfapi_by_default(tmp_path, monkeypatch):
    stand_in = StandInHub(tmp_path / "cache")
    for name in ("create_repo", "upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, name, lambda self, *a, _name=name, **k: getattr(stand_in, _name)(*a, **k))
    commit = gan_pipeline().push_to_hub("user/default-api", token="hf_test")
    assert [c[0] for c in stand_in.calls] == ["create_repo", "upload_folder", "upload_file"]
    assert f'revision="{commit.oid}"' in stand_in.calls[-1][3]


def test_save_pretrained_with_push_to_hub(tmp_path):
    """The folder is uploaded under its lock: another writer (here, another thread) cannot replace it mid-upload."""
    import threading

    from s2m_diffusers.utils import FolderBusyError, folder_lock

    api = StandInHub(tmp_path / "cache")
    busy = []

    def try_to_write(folder):
        try:
            with folder_lock(folder, wait=False):
                busy.append(False)
        except FolderBusyError:
            busy.append(True)

    upload = api.upload_folder

    def upload_while_another_writer_tries(*args, **kwargs):
        thread = threading.Thread(target=try_to_write, args=(tmp_path / "s2m",))
        thread.start()
        thread.join()
        return upload(*args, **kwargs)

    api.upload_folder = upload_while_another_writer_tries
    gan_pipeline().save_pretrained(tmp_path / "s2m", push_to_hub=True, repo_id="user/pushed", api=api)
    assert busy == [True]
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder", "upload_file"]
    readme = (tmp_path / "s2m" / "README.md").read_text()
    assert 'revision="' in readme and '"user/pushed"' in readme


# ---------------------------------------------------------------------------------------------------------------
# diffusers-cli


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.skipif(shutil.which("diffusers-cli") is None, reason="diffusers-cli is not installed")
def test_diffusers_cli_run_writes_images(tmp_path):
    gan_pipeline(default_target="A & ~B").save_pretrained(tmp_path / "s2m")
    args = [
        "diffusers-cli",
        "run",
        "--model",
        str(tmp_path / "s2m"),
        "--trust-remote-code",
        "--seed",
        "0",
        "--device-map",
        "cpu",
        "--output",
        str(tmp_path / "out") + os.sep,
        "--pipeline-kwargs",
        json.dumps({"num_images": 2, "negation_margin": 1.0, **FAST}),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["0000.png", "0001.png"]
