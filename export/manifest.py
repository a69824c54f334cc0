"""What an export leaves in the repository, and whether it is current (torch-free)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Bump when the exported graphs change (contract or arithmetic), so old exports are redone.
EXPORT_FORMAT_VERSION = 6
MANIFEST_NAME = "export.json"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportTarget:
    """Where one model's files live in the repository."""

    repository: Path
    model_name: str
    version: int = 1

    @property
    def folder(self) -> Path:
        return self.repository / self.model_name / str(self.version)

    @property
    def onnx_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None


def is_up_to_date(targets: list[ExportTarget], checkpoint_sha256: str) -> bool:
    for target in targets:
        manifest = target.read_manifest()
        if (
            manifest is None
            or not target.onnx_path.is_file()
            or manifest.get("checkpoint_sha256") != checkpoint_sha256
            or manifest.get("export_format_version") != EXPORT_FORMAT_VERSION
        ):
            return False
    return True


def write_manifest(target: ExportTarget, fields: dict) -> None:
    target.manifest_path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
