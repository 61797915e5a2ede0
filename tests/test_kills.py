"""Kills at chosen moments: a saved pipeline and an `s2m sample` output are complete or absent (or untouched), never
half-written or mixed, and the temporaries a killed writer leaves are removed by the next write.

Each test runs the writer in a child process that pauses at the chosen moment (a function monkeypatched to print
``KILLME`` and sleep); the test then kills the child with SIGKILL and inspects what is on disk.
"""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_cli import sample_args as cli_sample_args
from test_pipeline import gan_pipeline

from s2m_diffusers import hub
from s2m_diffusers.cli import main
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.utils import remove_stale_temporaries

torch.set_num_threads(1)
TESTS = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

PAUSE = """
import os, sys, time
sys.path.insert(0, {tests!r})


def pause(*args, **kwargs):
    print("KILLME", flush=True)
    time.sleep(300)


def pause_after(function, calls=1):
    done = []

    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        done.append(1)
        if len(done) >= calls:
            pause()
        return out

    return wrapped
"""


def kill_at_pause(code: str, tmp_path: Path) -> None:
    """Run `code` in a child process, SIGKILL it when it prints KILLME, and wait for it."""
    script = tmp_path / "child.py"
    script.write_text(PAUSE.format(tests=TESTS) + textwrap.dedent(code))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        for line in child.stdout:
            if line.strip() == "KILLME":
                os.kill(child.pid, signal.SIGKILL)
                break
        else:
            raise AssertionError(f"the child ended before the kill moment:\n{child.stderr.read()[-3000:]}")
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()


def digests(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def staged(folder: Path) -> list[str]:
    """The hidden entries but lock files: a killed writer also leaves its `.NAME.lock`, which no longer locks
    anything (the system released its flock with the process) and which the next writer removes."""
    return [name for name in hidden(folder) if not name.endswith(".lock")]


SAVE_OTHER_PIPELINE = """
import torch
import s2m_diffusers.hub as hub
import s2m_diffusers.utils as utils
from test_pipeline import gan_pipeline

{patch}
pipe = gan_pipeline()
with torch.no_grad():
    pipe.heads.dr_head.weight.add_(1.0)  # heads other than the saved ones
pipe.save_pretrained({dest!r})
"""

# the moments of a save: weights written but no manifest; everything staged, just before the swap; the new folder
# in place, while the old one (now in the staging folder) is being removed
MOMENTS = {
    "weights written": "hub.write_manifest = pause",
    "before the swap": "utils.swap_into_place = pause",
    "removing the old folder": (
        "real_rmtree = utils.shutil.rmtree\n"
        "utils.shutil.rmtree = lambda path, *a, **k: pause() if '.tmp-' in str(path) else real_rmtree(path, *a, **k)"
    ),
}


@pytest.mark.slow  # a child process killed (about 14 s on 2 cores)
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_save_killed_over_an_existing_pipeline_leaves_the_old_or_the_new_one_never_a_mix(tmp_path, moment):
    dest = tmp_path / "s2m"
    old = gan_pipeline()
    old.save_pretrained(dest)
    before = digests(dest)
    kill_at_pause(SAVE_OTHER_PIPELINE.format(patch=MOMENTS[moment], dest=str(dest)), tmp_path)

    after = digests(dest)
    loaded = S2MPipeline.from_pretrained(dest)  # loads, and its manifest check passes
    same_heads = torch.equal(loaded.heads.dr_head.weight, old.heads.dr_head.weight)
    if moment == "removing the old folder":  # the new folder was in place: all new
        assert not same_heads and torch.equal(loaded.heads.dr_head.weight, old.heads.dr_head.weight + 1.0)
        assert after["gan/diffusion_pytorch_model.safetensors"] == before["gan/diffusion_pytorch_model.safetensors"]
    else:  # untouched
        assert after == before and same_heads
    assert hidden(tmp_path), "the killed save leaves its temporary folder"
    old.save_pretrained(dest)  # the next save removes it
    assert hidden(tmp_path) == [] and digests(dest) == before


@pytest.mark.slow  # a child process killed (about 14 s on 2 cores)
def test_a_save_killed_into_a_new_folder_leaves_no_folder(tmp_path):
    dest = tmp_path / "s2m"
    kill_at_pause(SAVE_OTHER_PIPELINE.format(patch=MOMENTS["weights written"], dest=str(dest)), tmp_path)
    assert not dest.exists()
    (stale,) = staged(tmp_path)
    assert hidden(tmp_path) == [".s2m.lock", stale]  # the killed writer's lock, released by the system
    assert stale.startswith(".s2m.tmp-") and (tmp_path / stale / "heads").is_dir()  # full weights, hidden
    gan_pipeline().save_pretrained(dest)
    assert hidden(tmp_path) == [] and hub.MANIFEST_FILE in os.listdir(dest)
    S2MPipeline.from_pretrained(dest)


def test_an_old_folder_left_between_two_renames_is_put_back(tmp_path):
    """Where folders cannot be swapped in one step, the old one is renamed away first: a kill between the two
    renames leaves no folder, and the next write puts the old one back before it starts."""
    dest = tmp_path / "s2m"
    old = tmp_path / ".s2m.old-999999999-abc"  # no such process
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    assert remove_stale_temporaries(dest) == []
    assert (dest / "model_index.json").read_text() == "{}" and hidden(tmp_path) == []


def test_swap_without_renameat2_replaces_the_folder(tmp_path, monkeypatch):
    import s2m_diffusers.utils as utils

    monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    utils.replace_folder_atomically(lambda folder: Path(folder, "new.txt").write_text("new"), dest)
    assert sorted(os.listdir(dest)) == ["new.txt"] and hidden(tmp_path) == []


SAMPLE = """
import PIL.Image
from s2m_diffusers.cli import main

PIL.Image.Image.save = pause_after(PIL.Image.Image.save)  # killed once the first PNG is written
main({args!r})
"""


def sample_args(pipeline, output, *extra):
    """`s2m sample` arguments as in tests/test_cli.py, with a seed."""
    return cli_sample_args(str(pipeline), output, "--seed", "0", *extra)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kills") / "s2m"
    gan_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.slow  # a child process killed (about 14 s on 2 cores)
def test_a_killed_sample_leaves_no_output_and_evaluate_refuses_it(saved, tmp_path, capsys):
    out = tmp_path / "samples"
    kill_at_pause(SAMPLE.format(args=sample_args(saved, out)), tmp_path)
    assert not out.exists() and len(staged(tmp_path)) == 1  # the PNG went to the hidden staging folder
    evaluator = tmp_path / "evaluator"  # never reached: the images are checked first
    assert main(["evaluate", "--images", str(out), "--target", "A", "--evaluator", str(evaluator)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (staging,) = staged(tmp_path)
    assert main(["evaluate", "--images", str(tmp_path / staging), "--target", "A", "--evaluator", str(evaluator)]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert main(sample_args(saved, out)) == 0  # the next run writes it whole and removes the stale staging folder
    assert hidden(tmp_path) == [] and sorted(os.listdir(out))[-1] == "stats.json"


@pytest.mark.slow  # a child process killed (about 14 s on 2 cores)
def test_a_killed_sample_with_overwrite_leaves_the_previous_output_untouched(saved, tmp_path):
    out = tmp_path / "samples"
    assert main(sample_args(saved, out)) == 0
    before = digests(out)
    kill_at_pause(SAMPLE.format(args=sample_args(saved, out, "--overwrite", "--seed", "1")), tmp_path)
    assert digests(out) == before
