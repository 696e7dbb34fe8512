"""Content-addressed cache for trained weights and adversarial sets.

Entries are keyed by a hash of a JSON-able configuration plus the source code that produced them,
written atomically (a uniquely named temporary file + os.replace) so an interrupted run never leaves a
half-written entry, stored with a digest of their content, and read back with torch.load(weights_only=True).
An entry that cannot be read, fails its digest or holds non-finite numbers is named in a warning, moved
aside (<name>.corrupt) and recomputed; temporary files orphaned by a killed run are removed by the next one.
In a distributed job (lib.distributed) a shared entry is looked up and written by rank 0 alone, and what it read is
sent to the other ranks; work sharded over the ranks caches each rank's own part (`per_rank`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from lib import distributed
from lib.data import REPO_ROOT


def cache_root() -> Path:
    """$ADV_CACHE_DIR, else <repo>/cache."""
    return Path(os.environ.get("ADV_CACHE_DIR", REPO_ROOT / "cache")).expanduser()


def source_fingerprint(objects: Iterable[Any]) -> str:
    """Hash of the source files defining `objects` (classes, functions or modules): the code version."""
    h = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(o if inspect.ismodule(o) or inspect.isclass(o) or inspect.isfunction(o)
                                              else type(o)) for o in objects}):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def config_key(config: Any, code: str = "") -> str:
    """Stable short hash of a JSON-able configuration and a code fingerprint."""
    blob = json.dumps(config, sort_keys=True, default=str) + "|" + code
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Hash of tensors' contents: identifies data (training sets, inputs) in cache keys."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


DIGEST_KEY = "__content_digest__"
ORPHAN_SECONDS = 15 * 60   # a temporary file older than this belongs to no live write


class CorruptEntry(ValueError):
    """A cache entry that cannot be read, does not match its stored digest, or holds non-finite numbers."""


def _read_umask() -> int:
    """The process umask (reading it means setting it: done once, at import, before any writer thread runs)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _file_mode() -> int:
    """rw for everyone the umask allows (mkstemp alone makes files private to the user)."""
    return 0o666 & ~_UMASK


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """write(file object) into a uniquely named temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def content_digest(obj: Any) -> str:
    """Hash of a nest of dicts, lists and tensors (tensor bytes, dtypes and shapes; other leaves by repr)."""
    h = hashlib.sha256()

    def visit(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                h.update(f"K{key!r}".encode())
                visit(node[key])
        elif isinstance(node, (list, tuple)):
            h.update(f"L{len(node)}".encode())
            for item in node:
                visit(item)
        else:
            h.update(f"V{node!r}".encode())

    visit(obj)
    return h.hexdigest()


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` atomically; a dict is stored with the digest of its content, checked by `load`."""
    payload = {**obj, DIGEST_KEY: content_digest(obj)} if isinstance(obj, dict) else obj
    _atomic_write(path, lambda fh: torch.save(payload, fh), "wb")


def atomic_write_text(text: str, path: Path) -> None:
    """Write text atomically (uniquely named temporary file + rename), readable as the umask allows."""
    _atomic_write(path, lambda fh: fh.write(text), "w")


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write bytes atomically (uniquely named temporary file + rename), readable as the umask allows."""
    _atomic_write(path, lambda fh: fh.write(data), "wb")


def _non_finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_floating_point() and not bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return any(_non_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_non_finite(v) for v in obj)
    return False


def load(path: Path) -> Any:
    """Read a cache entry safely (tensors and plain containers only) and check it; CorruptEntry naming the file
    when it cannot be read, its content does not match the stored digest, or it holds NaN or inf."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptEntry(f"cache entry {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if isinstance(entry, dict):
        stored = entry.pop(DIGEST_KEY, None)
        if stored is None or stored != content_digest(entry):
            raise CorruptEntry(f"cache entry {path} does not match its stored content digest")
    if _non_finite(entry):
        raise CorruptEntry(f"cache entry {path} holds non-finite numbers (NaN or inf)")
    return entry


def load_or_none(path: Path, check: Callable[[Any], None] | None = None) -> Any | None:
    """`load(path)`, then `check(entry)` (which raises CorruptEntry when the entry does not fit its use, e.g. a
    parameter shape); None when there is no entry, or when it is corrupt: then it is moved aside to
    <path>.corrupt with a warning naming it, so that the caller recomputes it."""
    remove_orphans(path.parent)
    if not path.is_file():
        return None
    try:
        entry = load(path)
        if check is not None:
            check(entry)
        return entry
    except CorruptEntry as err:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        what = str(err) if str(path) in str(err) else f"cache entry {path}: {err}"
        warnings.warn(f"{what}; moved aside to {aside.name} and recomputing", RuntimeWarning, stacklevel=2)
        return None


def remove_orphans(folder: Path, older_than: float = ORPHAN_SECONDS) -> list[Path]:
    """Delete temporary files of atomic writes in `folder` left by a killed run (older than `older_than` s)."""
    removed = []
    now = time.time()
    for tmp in folder.glob("*.tmp") if folder.is_dir() else ():
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:   # another run finished or removed it meanwhile
            continue
    return removed


def cached_tensors(namespace: str, config: Any, compute: Callable[[], dict[str, torch.Tensor]],
                   code: str = "", *, per_rank: bool = False) -> dict[str, torch.Tensor]:
    """Return compute()'s tensors, computing them only when no valid entry exists for (config, code).

    In a distributed job every rank calls it alike: rank 0 looks the entry up and sends it to the others, or all
    compute (compute may hold collectives) and rank 0 writes. `per_rank`: this rank's own part of sharded work (e.g.
    one chunk of an adversarial set), looked up, computed and written by this rank alone."""
    path = cache_root() / namespace / f"{config_key(config, code)}.pt"
    entry = load_or_none(path) if per_rank else distributed.from_main(lambda: load_or_none(path))
    if entry is not None:
        return entry
    result = compute()
    if per_rank or distributed.is_main():
        atomic_save({k: v.detach().cpu() for k, v in result.items()}, path)
    return result
