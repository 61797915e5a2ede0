"""Small helpers shared by the library and the example scripts.

- [`write_text_atomically`] (and [`write_json_atomically`] on top of it): **the** atomic file writer.
- [`save_folder_atomically`] (and [`move_into_place`], [`save_pretrained_atomically`] on top of it): **the** atomic
  folder writer: a folder is written beside its destination, then moved into place by renames.
- [`replace_folder_atomically`] (on [`swap_into_place`]): a folder written beside its destination, then put in its
  place in one step, whole: a kill at any moment leaves the old folder (or none) or the new one, never a mix.
  Temporaries left by a killed writer are removed by the next write ([`remove_stale_temporaries`]).
- [`folder_lock`]: one writer of a folder at a time, across processes and threads (held by both folder writers above
  from what they decide to keep of the old folder through the final rename), so that two writes at once never mix.
- [`check_free_space`] (with [`weights_bytes`]): a clear error before a write that the disk cannot hold, and for one
  that fills it on the way ([`no_space_error`]).
- [`optional_dependency`]: an import of an optional package whose error names the extra that installs it.
- [`module_device_dtype`]: where and in which dtype a module computes (diffusers' offloading and casting hooks
  included).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # not a POSIX system: lock files created exclusively instead (`_acquire_exclusive_file`)
    fcntl = None

if TYPE_CHECKING:
    import torch

__all__ = [
    "FolderBusyError",
    "check_free_space",
    "no_space_error",
    "weights_bytes",
    "folder_lock",
    "hub_repo_id",
    "jsonable",
    "module_device_dtype",
    "optional_dependency",
    "move_into_place",
    "remove_stale_temporaries",
    "replace_folder_atomically",
    "save_folder_atomically",
    "save_pretrained_atomically",
    "staging_folder",
    "swap_into_place",
    "write_json_atomically",
    "write_text_atomically",
]

INDEX_FILE = "model_index.json"  # moved last: a pipeline folder's index never points at entries not yet in place


# A folder's text files (configs, card, code shims, manifest) beside its weights, and a margin for the file system.
FREE_SPACE_MARGIN = 16 * 2**20


def weights_bytes(modules) -> int:
    """The bytes of the parameters and buffers of ``modules`` (each tensor storage once): what their safetensors
    files hold, give or take their headers."""
    import torch

    seen, total = set(), 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            key = (
                (tensor.untyped_storage().data_ptr(), tensor.device.type)
                if tensor.device.type != "meta"
                else id(tensor)
            )
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def no_space_error(destination: str | os.PathLike, what: str, needed: int | None = None) -> OSError:
    """The error of a write of ``what`` to ``destination`` that the disk cannot hold: how much it needs (where
    known), how much is free, and that the folder in place is untouched."""
    where = _existing_parent(os.fspath(destination))
    free = shutil.disk_usage(where).free / 2**20
    if needed is not None:
        why = f"it needs about {needed / 2**20:,.0f} MiB and {where!r} has {free:,.0f} MiB free"
    else:
        why = (
            f"the disk filled while it was written ({where!r} has {free:,.0f} MiB free once the partial write is gone)"
        )
    return OSError(
        errno.ENOSPC,
        f"Cannot save {what} to {os.fspath(destination)!r}: {why}. Free some space or save elsewhere; the folder in "
        "place, if any, is as it was (nothing was half-written).",
    )


def check_free_space(destination: str | os.PathLike, needed: int, what: str) -> None:
    """Raise `OSError` (``ENOSPC``, [`no_space_error`]) before writing ``needed`` bytes (plus a margin for text files)
    beside ``destination`` where its file system has less free."""
    needed += FREE_SPACE_MARGIN
    if shutil.disk_usage(_existing_parent(os.fspath(destination))).free < needed:
        raise no_space_error(destination, what, needed)


def jsonable(value):
    """`value` as strict JSON: non-finite floats become `None`, tuples lists, tensors and arrays lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return value


# ----- files ----------------------------------------------------------------------------------------------------
def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: never a half-written file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomically(path: str | os.PathLike, data) -> None:
    """`data` as indented JSON (and a final newline), written with `write_text_atomically`."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


# ----- folders --------------------------------------------------------------------------------------------------
def _temporary_prefix(destination: str, kind: str) -> str:
    """``.NAME.tmp-PID-`` (a folder being written) or ``.NAME.old-PID-`` (a replaced folder being removed): hidden
    siblings of `destination` that name the process that made them, so that a later write knows when they are stale."""
    return f".{os.path.basename(destination)}.{kind}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(destination: str | os.PathLike) -> list[str]:
    """Remove what killed writers of `destination` left beside it: hidden ``.NAME.tmp-PID-*`` and ``.NAME.old-PID-*``
    siblings whose process no longer runs (and ``.NAME.tmp-*`` ones of older versions, which named no process). An
    old folder whose replacement never arrived (a kill between the two renames where the system cannot swap folders in
    one step) is put back at `destination` instead.

    Args:
        destination (`str`): the folder whose temporaries are removed.

    Returns:
        `list[str]`: the paths removed.
    """
    destination = os.path.abspath(os.fspath(destination))
    parent, name = os.path.split(destination)
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-(?:(\d+)-)?[\w-]+$")
    removed = []
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match is None or (match.group(1) is not None and _process_alive(int(match.group(1)))):
            continue
        path = os.path.join(parent, entry)
        if ".old-" in entry and not os.path.lexists(destination):
            os.rename(path, destination)  # killed between the two renames of `swap_into_place`: put it back
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


class FolderBusyError(BlockingIOError):
    """Another process (or thread) is writing the folder, and the caller asked not to wait ([`folder_lock`] with
    ``wait=False``). ``pid`` is the writer's process id, when its lock file names it."""

    def __init__(self, message: str, destination: str, pid: int | None = None):
        super().__init__(errno.EAGAIN, message)
        self.destination = destination
        self.pid = pid

    def __str__(self) -> str:
        return self.strerror


def lock_path(destination: str | os.PathLike) -> str:
    """The lock file of a folder: the hidden sibling ``.NAME.lock`` (it names its holder's process id)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(destination)))
    return os.path.join(parent, f".{name}.lock")


# the locks this process holds, by lock file and thread: a thread that holds a folder's lock may take it again
_HELD: dict[tuple[str, int], int] = {}
_HELD_GUARD = threading.Lock()
# an exclusively created lock file that names no process (its creator was killed before writing its id) is stale
# after this many seconds
_UNNAMED_LOCK_SECONDS = 10.0


@contextlib.contextmanager
def folder_lock(destination: str | os.PathLike, wait: bool = True) -> Iterator[str]:
    """Hold the lock of `destination` for the block: one writer of a folder at a time, across processes and threads.

    The lock is the hidden sibling ``.NAME.lock`` ([`lock_path`]), held with an exclusive ``flock``, which the system
    releases when its holder ends, killed or not: a killed writer never leaves the folder locked. The holder writes
    its process id into it (named to a writer that waits) and removes it when it is done; one left by a killed
    holder is taken over and removed by the next writer. Where ``flock`` is not available, the file is created
    exclusively instead, and one whose process no longer runs is taken as stale. A thread that holds the lock may
    take it again (nested blocks).

    Args:
        destination (`str`): the folder (it need not exist; its parent is created).
        wait (`bool`, defaults to `True`): wait for another writer to finish (with a warning that names it), or
            raise [`FolderBusyError`] at once.

    Yields:
        `str`: the lock file's path.

    Raises:
        FolderBusyError: ``wait=False`` and another writer holds the lock.
    """
    path = lock_path(destination)
    key = (path, threading.get_ident())
    with _HELD_GUARD:
        nested = key in _HELD
        if nested:
            _HELD[key] += 1
    if nested:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, exclusive = _acquire(path, os.path.abspath(os.fspath(destination)), wait)
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        yield path
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the lock is released: a writer waiting on this file then sees it gone
        if not exclusive:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(path: str, destination: str, wait: bool) -> tuple[int, bool]:
    """An open, locked lock file that still is `path` (the previous holder removes it before it lets go: the file a
    waiter got the lock on may be gone, then it locks the new one); its descriptor, and whether it was created
    exclusively (no ``flock``)."""
    warned = False
    while True:
        if fcntl is None:
            return _acquire_exclusive_file(path, destination, wait), True
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                warned = _busy(destination, _lock_holder(path), wait, warned)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:  # a file system without flock (some network ones)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise
                os.close(fd)
                return _acquire_exclusive_file(path, destination, wait), True
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd, False
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _acquire_exclusive_file(path: str, destination: str, wait: bool) -> int:
    """The lock taken by creating the lock file exclusively; a file whose process no longer runs (or, naming none,
    older than a few seconds) is stale and removed."""
    warned = False
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            try:
                age = time.time() - os.path.getmtime(path)
            except FileNotFoundError:
                continue
            if (holder is not None and not _process_alive(holder)) or (holder is None and age > _UNNAMED_LOCK_SECONDS):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            warned = _busy(destination, holder, wait, warned)
            time.sleep(0.05)
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _busy(destination: str, holder: int | None, wait: bool, warned: bool) -> bool:
    """Another writer holds the lock of `destination`: raise, or warn once that this one waits."""
    who = f"another process (PID {holder})" if holder not in (None, os.getpid()) else "another writer"
    if not wait:
        raise FolderBusyError(
            f"{destination!r} is being written by {who} right now. Wait for it to finish, or write to another path.",
            destination,
            holder,
        )
    if not warned:
        warnings.warn(f"{destination!r} is being written by {who}; waiting for it to finish.", UserWarning, 4)
    return True


def _lock_holder(path: str) -> int | None:
    """The process id a lock file names, or `None`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def staging_folder(destination: str | os.PathLike) -> Iterator[str]:
    """A fresh, empty folder beside `destination` (same file system, so that moving it is a rename), removed with
    whatever is left in it when the block ends."""
    destination = os.path.abspath(os.fspath(destination))
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_temporary_prefix(destination, "tmp"), dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); `False` where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # an old kernel, or a file system without the flag
    raise OSError(code, os.strerror(code), b)


def swap_into_place(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Make `destination` exactly the folder `source`, in one step where the system allows it.

    A new or empty `destination` is one rename. An existing one is swapped with `source` atomically (Linux); what was
    there is then at `source` and is removed. Elsewhere the old folder is first renamed to a hidden ``.NAME.old-PID-*``
    sibling: a kill between the two renames leaves no `destination`, never a mixed one.

    Args:
        source (`str`): the written folder; it is gone afterwards.
        destination (`str`): where it goes (a symbolic link to a folder: the folder it points to).
    """
    source, destination = os.fspath(source), os.path.abspath(os.fspath(destination))
    if os.path.islink(destination):
        destination = os.path.realpath(destination)
    if os.path.lexists(destination) and not os.path.isdir(destination):
        raise ValueError(f"{destination!r} exists and is not a folder; remove it or choose another path.")
    try:
        os.rename(source, destination)  # a new path, or an empty folder
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(source, destination):
        shutil.rmtree(source, ignore_errors=True)  # `source` now holds the old folder
        return
    old = tempfile.mkdtemp(prefix=_temporary_prefix(destination, "old"), dir=os.path.dirname(destination))
    os.rmdir(old)
    os.rename(destination, old)
    os.rename(source, destination)
    shutil.rmtree(old, ignore_errors=True)


def replace_folder_atomically(
    write: Callable[[str], Any],
    destination: str | os.PathLike,
    keep: Callable[[str], bool] | None = None,
    wait: bool = True,
) -> str:
    """Write a whole folder with ``write(tmp)`` into a staging folder beside `destination`, make it readable by all,
    then put it in place in one step ([`swap_into_place`]). Whatever moment a kill strikes, `destination` is either
    what it was (or absent) or the complete new folder; never a mix of both. The temporaries of an earlier, killed
    write are removed first ([`remove_stale_temporaries`]).

    One write at a time: the whole write, from the removal of stale temporaries through the final rename, holds the
    lock of `destination` ([`folder_lock`]). `write` and `keep` run under it, so that what they decide from the
    folder in place (e.g. which of its entries to keep) still holds when the new folder replaces it: two writes at
    once end as the one, then the other, each whole.

    Args:
        write (`Callable[[str], Any]`): writes the folder's whole content into the folder it is given.
        destination (`str`): the folder. Neither the working directory nor a folder that holds it.
        keep (`Callable[[str], bool]`, *optional*): which top-level entries of an existing `destination` that `write`
            did not write are carried into the new folder (hard links where possible, else copies; their
            permissions untouched). By default none: the new folder is exactly what `write` wrote.
        wait (`bool`, defaults to `True`): when another writer holds the lock, wait for it; `False` raises
            [`FolderBusyError`] at once.

    Returns:
        `str`: `destination` as an absolute path.

    Raises:
        FolderBusyError: ``wait=False`` and another writer holds the lock.
    """
    destination = os.path.abspath(os.fspath(destination))
    if os.path.islink(destination):  # replace the folder it points to, from beside it
        destination = os.path.realpath(destination)
    cwd = os.path.realpath(os.getcwd())
    real = os.path.realpath(destination)
    if cwd == real or cwd.startswith(real + os.sep):
        raise ValueError(
            f"Cannot replace {destination!r}: it is the working directory or holds it, and a folder is replaced as "
            "a whole. Run from another folder, or write to another path."
        )
    with folder_lock(destination, wait=wait):
        remove_stale_temporaries(destination)
        with staging_folder(destination) as tmp:
            write(tmp)
            _make_readable(tmp)
            if keep is not None and os.path.isdir(destination):
                for name in sorted(os.listdir(destination)):
                    if keep(name) and not os.path.lexists(os.path.join(tmp, name)):
                        _link_or_copy(os.path.join(destination, name), os.path.join(tmp, name))
            swap_into_place(tmp, destination)
    return destination


def _link_or_copy(source: str, destination: str) -> None:
    """A file or folder tree at `destination` made of hard links to `source`'s files (copies across file systems)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, destination, symlinks=True, copy_function=link)
    else:
        link(source, destination)


def move_into_place(source: str | os.PathLike, destination: str | os.PathLike, replace: bool = False) -> None:
    """Move a freshly written folder `source` to `destination`.

    Args:
        source (`str`): the written folder; it is gone afterwards.
        destination (`str`): where it goes.
        replace (`bool`, defaults to `False`): `True`: `destination` becomes exactly `source`, in one step
            ([`swap_into_place`]). `False`: one rename when `destination` is new or empty, else entry by entry,
            replacing entries of the same name and leaving the others, with `model_index.json` last.
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if replace:
        swap_into_place(source, destination)
        return
    if not os.path.exists(destination) or (os.path.isdir(destination) and not os.listdir(destination)):
        if os.path.isdir(destination):
            os.rmdir(destination)
        os.replace(source, destination)
        return
    if not os.path.isdir(destination):
        raise ValueError(f"save_directory {destination!r} exists and is not a folder.")
    entries = sorted(os.listdir(source), key=lambda name: name == INDEX_FILE)
    for name in entries:
        src, dst = os.path.join(source, name), os.path.join(destination, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=destination)
            os.replace(dst, os.path.join(old, name))
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)


def _make_readable(folder: str) -> None:
    """Folders 0o755 and files 0o644 (`tempfile.mkdtemp` makes a folder only its owner can read)."""
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def save_folder_atomically(write: Callable[[str], Any], destination: str | os.PathLike, replace: bool = False) -> str:
    """Write a folder with `write(tmp)` into a staging folder beside `destination`, make it readable by all, then
    [`move_into_place`]: a crash mid-write leaves `destination` as it was, never half written. Holds the lock of
    `destination` ([`folder_lock`]) throughout.

    Args:
        write (`Callable[[str], Any]`): writes the folder's content into the folder it is given, e.g.
            `model.save_pretrained`.
        destination (`str`): the folder.
        replace (`bool`, defaults to `False`): see [`move_into_place`]; `False` keeps entries of an existing
            `destination` that `write` does not write (e.g. checkpoints beside saved weights).

    Returns:
        `str`: `destination` as an absolute path.
    """
    destination = os.path.abspath(os.fspath(destination))
    with folder_lock(destination):
        remove_stale_temporaries(destination)
        with staging_folder(destination) as tmp:
            write(tmp)
            _make_readable(tmp)
            move_into_place(tmp, destination, replace=replace)
    return destination


def save_pretrained_atomically(obj, output_dir: str | os.PathLike) -> None:
    """`obj.save_pretrained` into a temporary folder beside `output_dir`, then swap it in (files readable by all).

    A crash mid-save leaves the previous `output_dir` intact, never a half-written one.
    """
    save_folder_atomically(obj.save_pretrained, output_dir, replace=True)


# ----- optional packages ----------------------------------------------------------------------------------------
# the extra of `pip install s2m-diffusers[EXTRA]` that installs each optional package (setup.cfg, extras_require)
EXTRAS = {"transformers": "transformers", "datasets": "datasets", "scipy": "test"}


@contextlib.contextmanager
def optional_dependency(package: str, purpose: str | None = None) -> Iterator[None]:
    """Imports of an optional package, inside the function that needs it, turned into an `ImportError` that names
    the extra installing it when the package is missing::

        with optional_dependency("transformers", "A transformers backbone"):
            from transformers import AutoModel

    Args:
        package (`str`): the top-level package, a key of ``EXTRAS``.
        purpose (`str`, *optional*): what needs it, for the message.
    """
    try:
        yield
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != package:
            raise  # another module is missing: its own message says which
        extra = EXTRAS.get(package, package)
        raise ModuleNotFoundError(
            f"{purpose or 'This'} needs the optional package `{package}`, which is not installed. Install it with "
            f"`pip install 's2m-diffusers[{extra}]'` (or `pip install {package}`).",
            name=package,
        ) from err


# ----- modules --------------------------------------------------------------------------------------------------
def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """`(device, dtype)` a module computes with: where its inputs go and in which dtype.

    diffusers' hooks come first, for any module (a diffusers `ModelMixin` or not): with layerwise casting
    (`enable_layerwise_casting`, `diffusers.hooks.apply_layerwise_casting`) the weights are stored in one dtype
    (e.g. `float8_e4m3fn`) and computed in another, its ``compute_dtype``; with group offloading
    (`enable_group_offload`, `diffusers.hooks.apply_group_offloading`) they rest on the offload device and run on its
    ``onload_device``. Then a `ModelMixin`'s own `.device` and `.dtype`, else those of the first floating-point
    parameter, else `(cpu, float32)` for a module without parameters.

    Args:
        module (`torch.nn.Module`): the module.

    Returns:
        `tuple[torch.device, torch.dtype]`.
    """
    import torch  # noqa: F811  (here, not above: `s2m --help` imports this module and need not load torch)
    from diffusers import ModelMixin

    device, dtype = _hooked_device_dtype(module)
    if device is not None and dtype is not None:
        return device, dtype
    if isinstance(module, ModelMixin):
        return device or module.device, dtype or module.dtype
    params = list(module.parameters())
    first = next((p for p in params if p.is_floating_point()), params[0] if params else None)
    if first is None:
        return device or torch.device("cpu"), dtype or torch.float32
    return device or first.device, dtype or first.dtype


def _hooked_device_dtype(module: torch.nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """The onload device of diffusers' group offloading and the compute dtype of its layerwise casting, when a
    submodule of `module` has those hooks (`None` for each that none has). Read through the hook registry diffusers
    attaches to a module (``_diffusers_hook``), as `ModelMixin.dtype` itself does."""
    import torch  # noqa: F811

    device = dtype = None
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        get_hook = getattr(registry, "get_hook", None)
        if get_hook is None:
            continue
        if dtype is None:
            dtype = getattr(get_hook("layerwise_casting"), "compute_dtype", None)
        if device is None:
            offload = get_hook("group_offloading")
            onload = getattr(getattr(offload, "group", None), "onload_device", None)
            device = None if onload is None else torch.device(onload)
        if device is not None and dtype is not None:
            break
    return device, dtype


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_repo_id(value: Any) -> str | None:
    """`value` when it names a Hub repo (``"user/name"``, not a local path), else `None`."""
    if isinstance(value, os.PathLike):
        return None
    if not isinstance(value, str) or not _HUB_ID.match(value) or os.path.exists(value):
        return None
    return value
