"""Resolve, download, verify and load a MobileSAM checkpoint: one code path for every source.

A checkpoint is either a local file or an http(s) URL. URLs are downloaded once into a cache
folder and verified by SHA-256 (the official URL's hash is known). Every failure is raised as
`CheckpointError` with a message that says what to do, never a bare traceback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from common.settings import OFFICIAL_CHECKPOINT_SHA256, OFFICIAL_CHECKPOINT_URL
from export.errors import CheckpointError

DOWNLOAD_TIMEOUT_S = 60
POINT_AT_LOCAL_FILE = (
    "Download weights/mobile_sam.pt from the MobileSAM GitHub repository on a machine with "
    "internet access and point MOBILESAM_CHECKPOINT (or --checkpoint) at the local file."
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def resolve_checkpoint(source: str, cache_dir: Path, expected_sha256: str | None = None) -> Path:
    """Return a local, verified path for `source` (a path or an http(s) URL)."""
    if not is_url(source):
        return readable_file(Path(source).expanduser())

    if expected_sha256 is None and source == OFFICIAL_CHECKPOINT_URL:
        expected_sha256 = OFFICIAL_CHECKPOINT_SHA256
    cached = cache_dir / Path(urlparse(source).path).name
    if cached.is_file() and (expected_sha256 is None or sha256_of(cached) == expected_sha256):
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    partial = Path(partial_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {source}: {exc}. {POINT_AT_LOCAL_FILE}") from exc

    actual = sha256_of(partial)
    if expected_sha256 is not None and actual != expected_sha256:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"downloaded {source} has SHA-256 {actual}, expected {expected_sha256}. "
            f"{POINT_AT_LOCAL_FILE}"
        )
    partial.replace(cached)
    return cached


def readable_file(path: Path) -> Path:
    """`path` if it is a file this process can read; else a CheckpointError that says why."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(
            f"checkpoint {path} is a broken symbolic link (to {os.readlink(path)}). "
            f"{POINT_AT_LOCAL_FILE}"
        )
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory, not a file: point at the .pt file itself"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}. {POINT_AT_LOCAL_FILE}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {exc.strerror} (check its permissions and owner)"
        ) from exc
    return path


def load_mobilesam(path: Path):
    """Build upstream's `vit_t` architecture and load `path` into it, strictly."""
    import pickle
    import warnings
    import zipfile

    import torch

    with warnings.catch_warnings():  # timm's deprecation notices on mobile_sam's import
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from mobile_sam import sam_model_registry

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). {POINT_AT_LOCAL_FILE}"
        ) from exc
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointError(
            f"{path} does not hold a state_dict (got {type(state_dict).__name__})"
        )

    sam = sam_model_registry["vit_t"]()
    model_keys = set(sam.state_dict())
    missing = sorted(model_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - model_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a MobileSAM vit_t checkpoint: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the vit_t architecture: {exc}") from exc
    return sam.eval()
