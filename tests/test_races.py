"""Two writers of one folder at once (issue 29, item 1): two saves, a fit and a save racing another save, two
`s2m sample` runs into one --output. A folder always ends as exactly one complete write (the later one, or the first
with a clear error for the other), never a mix; and loading refuses a folder that mixes two saves anyway (made by an
older version, or by hand), `fits/` and generator folders included.

The races run in threads forced to overlap (fast), and in real subprocesses released together by a barrier file,
several rounds each (`slow`)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
from test_cli import sample_args as cli_sample_args
from test_conventions import ddim_pipeline
from test_kills import TESTS, digests, hidden
from test_pipeline import FAST, gan_pipeline, seeded
from test_reliability import error_of
from test_reliability import sample as sample_command

from s2m_diffusers import hub, utils
from s2m_diffusers.cli import main
from s2m_diffusers.evaluation import check_sample_folder
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.utils import FolderBusyError, folder_lock, lock_path, replace_folder_atomically

torch.set_num_threads(1)
# a call that measures `dv_strength="auto"`: the pipeline then saves what it measured (and fitted) under fits/
MEASURE = {"num_images": 1, "dv_strength": "auto", "negation_margin": 1.0, **FAST}


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """A GAN pipeline that saves a `fits/` folder and a DDIM pipeline, each saved alone once: the two saves a race
    may end as."""
    root = tmp_path_factory.mktemp("races")
    gan = gan_pipeline()
    gan("A", generator=seeded(0), **MEASURE)
    pipes = {"gan": gan, "ddim": ddim_pipeline()}
    for name, pipe in pipes.items():
        pipe.save_pretrained(root / name)
    return pipes, {name: digests(root / name) for name in pipes}


def assert_one_whole_save(folder: Path, references: dict) -> str:
    """`folder` is, file for file, exactly one of the reference saves, and loads; which one."""
    files = digests(folder)
    matches = [name for name, reference in references.items() if files == reference]
    extra = {name: sorted(set(files) ^ set(reference)) for name, reference in references.items()}
    assert len(matches) == 1, f"a mix of saves: files that differ from each save {extra}"
    S2MPipeline.from_pretrained(folder)  # and its manifest check passes
    return matches[0]


# ---------------------------------------------------------------------------------------------------------------
# The lock


def hold_lock(path) -> tuple[threading.Thread, threading.Event]:
    """Another writer holding ``path``'s lock, in a thread, until the returned event is set."""
    taken, release = threading.Event(), threading.Event()

    def hold():
        with folder_lock(path):
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    return holder, release


def test_the_lock_is_one_writer_at_a_time_and_names_its_holder(tmp_path):
    dest = tmp_path / "out"
    holder, release = hold_lock(dest)
    assert Path(lock_path(dest)).read_text().strip() == str(os.getpid())  # it names the process that holds it
    with pytest.raises(FolderBusyError, match="is being written by another writer") as busy:
        replace_folder_atomically(lambda folder: Path(folder, "x").write_text("x"), dest, wait=False)
    assert busy.value.pid == os.getpid() and not dest.exists()
    with folder_lock(tmp_path / "other", wait=False):  # another folder's lock is another lock
        pass
    release.set()
    holder.join()
    with pytest.warns(UserWarning, match="waiting for it to finish"):  # a waiting writer says why it waits
        holder, release = hold_lock(dest)
        threading.Timer(0.2, release.set).start()
        replace_folder_atomically(lambda folder: Path(folder, "x").write_text("x"), dest)
    holder.join()
    assert os.listdir(dest) == ["x"] and hidden(tmp_path) == []  # the lock file goes with its holder
    with folder_lock(dest), folder_lock(dest, wait=False):  # a thread may take its own lock again
        pass


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "exclusive-file"])
def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path, monkeypatch, flock):
    if not flock:  # a system without flock: the lock file is created exclusively and names its process
        monkeypatch.setattr(utils, "fcntl", None)
    dest = tmp_path / "out"
    Path(lock_path(dest)).write_text("999999999\n")  # a process that no longer runs
    replace_folder_atomically(lambda folder: Path(folder, "x").write_text("x"), dest, wait=False)
    assert os.listdir(dest) == ["x"] and hidden(tmp_path) == []
    if not flock:  # a live holder (this test's parent process) keeps it
        Path(lock_path(dest)).write_text(f"{os.getppid()}\n")
        with pytest.raises(FolderBusyError, match=rf"another process \(PID {os.getppid()}\)"):
            replace_folder_atomically(lambda folder: None, dest, wait=False)


# ---------------------------------------------------------------------------------------------------------------
# Two saves at once


def test_two_saves_into_one_new_folder_at_once_end_as_one_whole_save(two_saves, tmp_path, monkeypatch):
    """Each save is held inside its write until the other is writing too (or a second has passed): without the
    lock both decide what to keep of a folder that does not exist yet, and the second keeps the first's `gan/` and
    `fits/` (or `unet/` and `scheduler/`) beside its own components."""
    pipes, references = two_saves
    write = hub._write_pipeline_folder
    writing = {name: threading.Event() for name in pipes}

    def overlapping(pipeline, folder, *args, **kwargs):
        name = "gan" if pipeline is pipes["gan"] else "ddim"
        writing[name].set()
        writing["ddim" if name == "gan" else "gan"].wait(1.0)
        return write(pipeline, folder, *args, **kwargs)

    monkeypatch.setattr(hub, "_write_pipeline_folder", overlapping)
    dest, errors = tmp_path / "s2m", []

    def save(name):
        try:
            pipes[name].save_pretrained(dest)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=save, args=(name,)) for name in pipes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert_one_whole_save(dest, references)
    assert hidden(tmp_path) == []
    assert any("waiting for it to finish" in str(w.message) for w in caught)  # the second save waited its turn


def test_a_save_over_a_pipeline_replaces_its_fits_and_components(two_saves, tmp_path):
    pipes, references = two_saves
    dest = tmp_path / "s2m"
    pipes["gan"].save_pretrained(dest)
    (dest / "notes.txt").write_text("mine")
    pipes["ddim"].save_pretrained(dest)
    files = digests(dest)
    assert files.pop("notes.txt") and files == references["ddim"]  # the user's notes kept, nothing of the GAN


def test_a_folder_holding_another_saves_fits_or_generator_is_refused(two_saves, tmp_path, capsys):
    """What a race left with earlier versions: a DDIM pipeline that also carries a GAN save's `gan/` and `fits/`
    (and loaded as a DDIM pipeline with the GAN's fit)."""
    pipes, _ = two_saves
    pipes["gan"].save_pretrained(tmp_path / "gan")
    for extra in (["fits"], ["gan"]):
        folder = tmp_path / f"mixed-{extra[0]}"
        pipes["ddim"].save_pretrained(folder)
        for name in extra:
            shutil.copytree(tmp_path / "gan" / name, folder / name)
        with pytest.raises(ValueError, match=rf"were not saved with it: {extra[0]}/"):
            S2MPipeline.from_pretrained(folder)
        assert sample_command(folder, tmp_path / "out") == 2
        assert "do not belong together" in error_of(capsys)
    # a save's own fits/ is covered: a file added there is refused too
    folder = tmp_path / "gan"
    (folder / "fits" / "extra.json").write_text((folder / "fits" / "dv_strength.json").read_text())
    with pytest.raises(ValueError, match=r"were not saved with it: fits/extra\.json"):
        S2MPipeline.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Two `s2m sample` runs into one --output


def test_a_sample_run_refuses_an_output_another_run_is_writing(tmp_path, capsys):
    saved = tmp_path / "s2m"
    gan_pipeline().save_pretrained(saved)
    out = tmp_path / "samples"
    thread, release = hold_lock(out)
    try:
        for extra in ([], ["--overwrite"]):
            assert sample_command(saved, out, *extra) == 2
            assert "is being written by another process" in error_of(capsys)
            assert not out.exists()
    finally:
        release.set()
        thread.join()
    assert sample_command(saved, out) == 0 and check_sample_folder(str(out))


# ---------------------------------------------------------------------------------------------------------------
# Real processes started together, several rounds (slow)

RACER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)


def released(round):
    print("done" if round else "ready", flush=True)
    barrier = os.path.join({root!r}, f"go-{{round}}")
    while not os.path.exists(barrier):
        time.sleep(0.001)


{body}
"""

SAVE_ROUNDS = """
from test_conventions import ddim_pipeline
from test_pipeline import gan_pipeline, seeded
from test_races import MEASURE

pipe = gan_pipeline() if {kind!r} == "gan" else ddim_pipeline()
if {kind!r} == "gan":
    pipe("A", generator=seeded(0), **MEASURE)  # what it measured is saved under fits/
for round in range({rounds}):
    released(round)
    pipe.save_pretrained(os.path.join({root!r}, f"s2m-{{round}}"))
print("done", flush=True)
"""

SAMPLE_ROUNDS = """
import contextlib
from s2m_diffusers.cli import main
from test_races import into

codes = []
for round in range({rounds}):
    released(round)
    with contextlib.redirect_stdout(sys.stderr):  # what it wrote: into the log
        codes.append(main(into({args!r}, os.path.join({root!r}, f"out-{{round}}"))))
print("done", flush=True)
print(json.dumps(codes), flush=True)
"""


def race(tmp_path: Path, bodies: list[str], rounds: int) -> list[str]:
    """Start one process per body and release them together, round after round: each prints a line when it is
    ready for the next round, and the round starts when a barrier file appears, once every process is ready. Returns
    the last line each printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    children, logs = [], []
    for i, body in enumerate(bodies):
        script = tmp_path / f"racer{i}.py"
        script.write_text(RACER.format(tests=TESTS, root=str(tmp_path), body=textwrap.dedent(body)))
        logs.append(open(tmp_path / f"racer{i}.log", "w"))  # noqa: SIM115 (closed below)
        command = [sys.executable, str(script)]
        children.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=logs[-1], text=True, env=env))
    try:
        for round in range(rounds + 1):
            for child in children:  # every process ready (or done with the last round)
                line = child.stdout.readline().strip()
                assert line in ("ready", "done"), (line, [log.name for log in logs])
            if round < rounds:
                (tmp_path / f"go-{round}").touch()
        outputs = [child.stdout.read() for child in children]  # (not communicate: readline buffered the rest)
        for child in children:
            child.wait(timeout=300)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.stdout.close()
        for log in logs:
            log.close()
    assert all(child.returncode == 0 for child in children), [Path(log.name).read_text()[-2000:] for log in logs]
    return [out.strip().splitlines()[-1] if out.strip() else "" for out in outputs]


@pytest.mark.slow
def test_two_processes_saving_into_one_folder_at_once_end_as_one_whole_save(two_saves, tmp_path):
    _, references = two_saves
    rounds = 5
    bodies = [SAVE_ROUNDS.format(kind=kind, rounds=rounds, root=str(tmp_path)) for kind in ("gan", "ddim")]
    race(tmp_path, bodies, rounds)
    winners = [assert_one_whole_save(tmp_path / f"s2m-{r}", references) for r in range(rounds)]
    assert set(winners) <= {"gan", "ddim"}
    assert hidden(tmp_path) == []


def into(args: list[str], output) -> list[str]:
    """`s2m sample` arguments with another --output."""
    args = list(args)
    args[args.index("--output") + 1] = str(output)
    return args


def without_stats(files: dict) -> dict:
    """The files of a sample folder but stats.json (its seconds differ from run to run)."""
    return {name: digest for name, digest in files.items() if name != "stats.json"}


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True], ids=["new-output", "overwrite"])
def test_two_sample_runs_into_one_output_never_mix(tmp_path, overwrite):
    saved = tmp_path / "s2m"
    gan_pipeline().save_pretrained(saved)
    extra = ["--overwrite"] if overwrite else []
    runs = {seed: cli_sample_args(str(saved), "OUTPUT", "--seed", str(seed), *extra) for seed in (1, 2)}
    references = {}
    for seed, args in runs.items():  # each run alone: the folder it writes
        assert main(into(args, tmp_path / f"alone-{seed}")) == 0
        references[seed] = without_stats(digests(tmp_path / f"alone-{seed}"))
    rounds = 4
    bodies = [SAMPLE_ROUNDS.format(rounds=rounds, root=str(tmp_path), args=args) for args in runs.values()]
    codes = [json.loads(line) for line in race(tmp_path, bodies, rounds)]
    for r in range(rounds):
        out = tmp_path / f"out-{r}"
        files = without_stats(digests(out))
        matches = [seed for seed, reference in references.items() if files == reference]
        assert len(matches) == 1, f"round {r}: a mix of two runs"
        assert check_sample_folder(str(out))  # complete, and evaluate takes it
        pair = sorted(code[r] for code in codes)
        assert pair == [0, 2] or (overwrite and pair == [0, 0]), f"round {r}: exit statuses {pair}"
    assert hidden(tmp_path) == []
