"""Content-addressed cache for trained weights and adversarial sets.

Entries are keyed by a hash of a JSON-able configuration plus the source code that produced them,
written atomically (temporary file + os.replace) so an interrupted run never leaves a half-written
entry, and read back with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    """Write text atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> Any:
    """Read a cache entry safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def cached_tensors(namespace: str, config: Any, compute: Callable[[], dict[str, torch.Tensor]],
                   code: str = "") -> dict[str, torch.Tensor]:
    """Return compute()'s tensors, computing them only when no entry exists for (config, code)."""
    path = cache_root() / namespace / f"{config_key(config, code)}.pt"
    if path.is_file():
        return load(path)
    result = compute()
    atomic_save({k: v.detach().cpu() for k, v in result.items()}, path)
    return result
