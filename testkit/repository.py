"""Copies of the committed model repository for a test's or a benchmark's own Triton."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.settings import PROJECT_ROOT

SOURCE_REPOSITORY = PROJECT_ROOT / "model_repository"
EXPORTED_FILES = ("model.onnx", "export.json")


def copy_layout(
    target: Path, exported: Path | None = None, source: Path = SOURCE_REPOSITORY
) -> Path:
    """The committed configs and model.py files (symlinks kept) in `target`.

    Exported files already in `target` stay (so an export there is reused); with `exported`,
    that repository's model.onnx and export.json are linked in instead. Re-copied every time,
    so that the next run sees config edits.
    """
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if "__pycache__" in relative.parts or path.name in EXPORTED_FILES:
            continue
        if path.suffix == ".partial":
            continue
        destination = target / relative
        if path.is_dir() and not path.is_symlink():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.unlink(missing_ok=True)
        if path.is_symlink():
            destination.symlink_to(path.readlink())
        else:
            shutil.copy2(path, destination)
    if exported is not None:
        for config in target.glob("*/config.pbtxt"):
            for name in EXPORTED_FILES:
                exported_file = (exported / config.parent.name / "1" / name).resolve()
                if not exported_file.is_file():
                    raise FileNotFoundError(f"{exported_file} is missing: run the export first")
                link = config.parent / "1" / name
                link.unlink(missing_ok=True)
                link.symlink_to(exported_file)
    return target
