"""Two writers of one folder at once (issue 29, item 1): two saves, a fit and a save racing another save, two
`s2m sample` runs into one --output. A folder always ends as exactly one complete write (the later one, or the first
with a clear error for the other), never a mix; and loading refuses a folder that mixes two saves anyway (made by an
older version, or by hand), `fits/` and generator folders included.

The races run in threads forced to overlap (fast), and in real subprocesses released together by a barrier file,
several rounds each (`slow`)."""

import os
import threading
from pathlib import Path

import pytest
import torch
from test_kills import hidden

from s2m_diffusers import utils
from s2m_diffusers.utils import FolderBusyError, folder_lock, lock_path, replace_folder_atomically

torch.set_num_threads(1)
FIT = {"fit_size": 32, "negation_margin": 1.0}

# ---------------------------------------------------------------------------------------------------------------
# The lock


def test_the_lock_is_one_writer_at_a_time_and_names_its_holder(tmp_path):
    dest = tmp_path / "out"
    taken, release = threading.Event(), threading.Event()

    def hold():
        with folder_lock(dest):
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    assert Path(lock_path(dest)).read_text().strip() == str(os.getpid())  # it names the process that holds it
    with pytest.raises(FolderBusyError, match="is being written by another writer") as busy:
        replace_folder_atomically(lambda folder: Path(folder, "x").write_text("x"), dest, wait=False)
    assert busy.value.pid == os.getpid() and not dest.exists()
    with folder_lock(tmp_path / "other", wait=False):  # another folder's lock is another lock
        pass
    release.set()
    holder.join()
    with pytest.warns(UserWarning, match="waiting for it to finish"):  # a waiting writer says why it waits
        taken.clear()
        release.clear()
        holder = threading.Thread(target=hold)
        holder.start()
        assert taken.wait(10)
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
