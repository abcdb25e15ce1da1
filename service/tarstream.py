"""Stream a directory as an uncompressed tar without building it on disk or in memory.

Only regular files (and, when asked, empty directories) that really live inside the
directory are streamed: symlinks (to a file or a directory, inside or outside) are
skipped and never followed, and each file is opened with ``O_NOFOLLOW`` and checked to
be a regular file, so a link swapped in after the listing is not read either.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from trainers.contract.checkpoints import resume_only

_BLOCK = 512


def _wanted(name: str) -> bool:
    return not resume_only(name)  # trainer state, needed to resume, not to use the model


def _files(root: Path, empty_dirs: bool = False) -> list[Path]:
    """Regular files below ``root`` (and, with ``empty_dirs``, directories that hold
    nothing), sorted; symlinked files and directories left out."""
    out: list[Path] = []
    for here, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(here, d))]
        if empty_dirs and not dirs and not names and Path(here) != root:
            out.append(Path(here))
        for name in names:
            path = Path(here) / name
            if _wanted(name) and not path.is_symlink() and path.is_file():
                out.append(path)
    return sorted(out)


def _open_regular(path: Path) -> int | None:
    """A descriptor of ``path`` if it is (still) a regular file and not a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def tar_stream(
    root: Path, arcname: str, chunk: int = 1 << 20, empty_dirs: bool = False
) -> Iterator[bytes]:
    """Yield a POSIX tar of ``root``'s files (trainer-only state left out) under ``arcname``/;
    with ``empty_dirs``, empty directories too (an MLflow store needs its runs' empty
    ``artifacts/`` folders)."""
    for path in _files(root, empty_dirs):
        if path.is_dir():
            info = tarfile.TarInfo(f"{arcname}/{path.relative_to(root)}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            continue
        fd = _open_regular(path)
        if fd is None:
            continue
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            info = tarfile.TarInfo(f"{arcname}/{path.relative_to(root)}")
            info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            left = info.size
            while left > 0 and (data := fh.read(min(chunk, left))):
                left -= len(data)
                yield data
            if left > 0:  # the file shrank while streaming: keep the archive well-formed
                yield b"\0" * left
        if pad := (-info.size) % _BLOCK:
            yield b"\0" * pad
    yield b"\0" * (2 * _BLOCK)
