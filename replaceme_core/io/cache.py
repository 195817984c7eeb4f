"""Where derived artefacts live, how they are keyed, and how they are written without ever being half-done."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def cache_dir(*parts: str) -> Path:
    """Root of everything the project derives (converted models, benchmark files, eval results).

    `REPLACEME_CACHE` overrides the default `~/.cache/replaceme`, so CI and users can point it anywhere.
    """
    root = Path(os.environ.get("REPLACEME_CACHE", Path.home() / ".cache" / "replaceme")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_json(obj: Any) -> str:
    """Canonical JSON so that equal configs hash equally whatever the key order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_bytes(*chunks: bytes | str) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.encode() if isinstance(c, str) else c)
    return h.hexdigest()


def hash_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def concatenate_files(sources, out: str | Path, expected_sha256: str | None = None, error=ValueError) -> str:
    """Join `sources` into `out` through a temporary file beside it; the joined file's sha256. With `expected_sha256`,
    a mismatch raises `error` and leaves nothing behind (split GGUF parts, bundle parts)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as fo:
            for src in sources:
                with open(src, "rb") as fi:
                    while block := fi.read(1 << 22):
                        h.update(block)
                        fo.write(block)
        if expected_sha256 and h.hexdigest() != expected_sha256:
            raise error(f"joined {out.name} has sha256 {h.hexdigest()}, expected {expected_sha256}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    On any exception the temporary directory is removed and `target` is untouched, so a crash
    never leaves a half-written checkpoint or asset behind.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a reader never sees half a file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
