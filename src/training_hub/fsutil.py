"""Writing a directory so that it is complete or absent: the one helper every writer of a folder uses
(checkpoints and training states, the data cache, the tiny model). Stdlib only; the lowest layer."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Literal


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only read by setting)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(final: Path, *, prefix: str | None = None,
                     existing: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` when the block succeeds, delete it otherwise.

    ``existing``: what to do when ``final`` exists by then: ``"replace"`` it (a leftover of an interrupted run at
    the same point), or ``"keep"`` it and drop ours (another process wrote an equivalent entry first).
    The directory gets the permissions a plain ``mkdir`` would give (``mkdtemp`` alone makes it 0700).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".tmp-{final.name}-", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~umask())
        yield tmp
        if final.exists() and existing == "keep":
            shutil.rmtree(tmp)
            return
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
