"""Atomic writes that never delete what the package did not write.

Every output is written to a temporary beside its destination and renamed into place, so a
reader never sees a half-written file or folder. A destination of the wrong kind (a folder where
a file goes, a folder holding someone else's files) is refused before anything is written.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import AbstractSet, Iterable, Iterator, NamedTuple

# Linux's renameat2 swaps two paths in one step (RENAME_EXCHANGE); glibc >= 2.28 exports it.
_RENAMEAT2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform.startswith("linux") else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
# Answers of a kernel, filesystem or seccomp filter that cannot exchange (EPERM: unknown syscalls under some filters).
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}
# atomic_path's temporaries: ``.{name}.`` and tempfile.mkdtemp's 8 random characters.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}")


class FolderKind(NamedTuple):
    """What a folder written with :func:`atomic_path` holds, so an earlier one can be recognised and replaced.

    The default entries are the package's checkpoint layout (``config.json`` + ``model.safetensors``).

    Attributes:
        what: What such a folder is, for messages (e.g. ``"saved policy"``).
        config_keys: Keys its ``config.json`` holds (empty: there is no ``config.json`` to check).
        entries: Names every such folder holds.
        optional: Names it may hold as well.
    """

    what: str
    config_keys: AbstractSet[str] = frozenset()
    entries: AbstractSet[str] = frozenset({"config.json", "model.safetensors"})
    optional: AbstractSet[str] = frozenset()


@contextmanager
def atomic_path(path: str | os.PathLike, folder: FolderKind | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) and move it into place on success.

    Without ``folder`` the output is a file: an existing regular file at ``path`` is replaced, and
    anything else there (a folder, a socket, ...) is refused. With ``folder`` the caller creates a
    folder at the yielded path: ``path`` may be absent, an empty folder or an earlier output of the
    same kind, which is replaced so that ``path`` holds one complete version at every instant
    (an atomic exchange on Linux; elsewhere ``path`` is missing between two renames, and a kill
    there leaves both versions complete in the ``.{name}.XXXXXXXX`` folder beside it).

    On error the temporary is removed and ``path`` is untouched.

    Raises:
        IsADirectoryError: a file output, and ``path`` is a folder.
        FileExistsError: ``path`` is something else that this output must not replace.
    """
    path = Path(path)
    _check_destination(path, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / f"partial{path.suffix}"
    try:
        yield tmp
        if folder is not None and (found := _foreign(tmp, folder)):
            raise RuntimeError(f"the {folder.what} written to {tmp} {found}; its FolderKind does not describe it")
        _check_destination(path, folder)  # again: the destination may have changed while the output was written
        if folder is not None and path.is_dir() and os.listdir(path):
            _swap_in(tmp, path, tmp_dir)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def leftover_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Temporaries that killed :func:`atomic_path` writes to ``folder/<name>`` (``name`` in ``names``) left behind.

    Only folders named by atomic_path's pattern and holding nothing but its temporaries count, so
    a user's dot-folder is never taken for one. Delete them only while no write to them is running.
    """
    names = set(names)
    found = []
    for entry in Path(folder).iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match and match["name"] in names and entry.is_dir() and not entry.is_symlink():
            if set(os.listdir(entry)) <= {f"partial{Path(match['name']).suffix}", "old"}:
                found.append(entry)
    return found


def _check_destination(path: Path, folder: FolderKind | None) -> None:
    if folder is None:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file path (nothing was changed)")
        if os.path.lexists(path) and not path.is_file():
            raise FileExistsError(f"{path} exists and is not a regular file; give another path (nothing was changed)")
    elif os.path.lexists(path) and (found := _foreign(path, folder)):
        raise FileExistsError(
            f"{path} {found}, so it is not an earlier {folder.what} to replace; nothing was changed: "
            "give a new or empty folder, or move its contents away"
        )


def _foreign(path: Path, folder: FolderKind) -> str | None:
    """What makes the existing ``path`` something other than an empty folder or a ``folder`` output (None: nothing)."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is not a folder"
    names = set(os.listdir(path))
    if not names:
        return None
    if other := names - folder.entries - folder.optional:
        return f"holds {sorted(other)}"
    if missing := folder.entries - names:
        return f"lacks {sorted(missing)}"
    if folder.config_keys:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return "has an unreadable config.json"
        if not isinstance(config, dict) or not folder.config_keys <= config.keys():
            return "has a config.json of another kind"
    return None


def _swap_in(new: Path, path: Path, aside: Path) -> None:
    """Put the folder ``new`` at ``path``; the earlier version ends up inside ``aside`` (to be deleted)."""
    if exchange_folders(new, path):
        return
    os.rename(path, aside / "old")
    os.rename(new, path)


def exchange_folders(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically; ``False`` where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(b))
