"""Stream a directory as an uncompressed tar without building it on disk or in memory."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

_BLOCK = 512
# Trainer state that is needed to resume, not to use the model.
SKIP = {"optimizer.pt", "scheduler.pt", "training_args.bin", "scaler.pt"}


def _wanted(path: Path) -> bool:
    return path.is_file() and path.name not in SKIP and not path.name.startswith("rng_state")


def tar_stream(root: Path, arcname: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Yield a POSIX tar of ``root``'s files (trainer-only state left out) under ``arcname``/."""
    for path in sorted(p for p in root.rglob("*") if _wanted(p)):
        info = tarfile.TarInfo(f"{arcname}/{path.relative_to(root)}")
        st = path.stat()
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as fh:
            while data := fh.read(chunk):
                yield data
        if pad := (-info.size) % _BLOCK:
            yield b"\0" * pad
    yield b"\0" * (2 * _BLOCK)
