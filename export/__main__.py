"""`python -m export [--checkpoint PATH_OR_URL] [--force]`: export and verify both models."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.settings import get_settings
from export.checkpoint import resolve_checkpoint, sha256_of
from export.errors import CheckpointError, VerificationError
from export.manifest import ExportTarget, is_up_to_date, write_manifest

log = logging.getLogger("export")


def run_export(
    checkpoint: str,
    repository: Path,
    force: bool = False,
    expected_sha256: str | None = None,
    cache_dir: Path | None = None,
) -> bool:
    """Export both models into `repository`; returns False when they were already current."""
    settings = get_settings()
    path = resolve_checkpoint(
        checkpoint, cache_dir or settings.checkpoint_cache_dir, expected_sha256
    )
    checkpoint_sha256 = sha256_of(path)
    encoder = ExportTarget(repository, settings.encoder_model)
    decoder = ExportTarget(repository, settings.decoder_model)
    if not force and is_up_to_date([encoder, decoder], checkpoint_sha256):
        log.info("models in %s are current for checkpoint %s", repository, checkpoint_sha256[:12])
        return False

    # torch is imported only when there is work to do, so the up-to-date check stays fast.
    from export.checkpoint import load_mobilesam
    from export.onnx_export import build_manifest, export_decoder, export_encoder
    from export.verify import verify_decoder, verify_encoder

    sam = load_mobilesam(path)
    staged = {}
    for target, exporter in ((encoder, export_encoder), (decoder, export_decoder)):
        target.folder.mkdir(parents=True, exist_ok=True)
        target.manifest_path.unlink(missing_ok=True)  # a half-done export is never "current"
        staged[target] = target.onnx_path.with_suffix(".onnx.partial")
        log.info("exporting %s", target.model_name)
        exporter(sam, staged[target])

    log.info("verifying %s against PyTorch", encoder.model_name)
    encoder_errors, embeddings = verify_encoder(sam, staged[encoder])
    log.info("verifying %s against PyTorch", decoder.model_name)
    decoder_errors = verify_decoder(sam, staged[decoder], embeddings)

    for target, errors in ((encoder, encoder_errors), (decoder, decoder_errors)):
        staged[target].replace(target.onnx_path)
        write_manifest(target, build_manifest(checkpoint_sha256, checkpoint, errors))
        log.info("wrote %s (max error %.3g)", target.onnx_path, max(errors.values()))
    return True


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        default=settings.mobilesam_checkpoint,
        help="local file or http(s) URL (default: $MOBILESAM_CHECKPOINT or the official weights)",
    )
    parser.add_argument(
        "--sha256",
        default=settings.mobilesam_checkpoint_sha256,
        help="expected SHA-256 of a downloaded checkpoint",
    )
    parser.add_argument("--model-repository", type=Path, default=settings.model_repository)
    parser.add_argument("--force", action="store_true", help="export even if current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        run_export(args.checkpoint, args.model_repository, args.force, args.sha256)
    except (CheckpointError, VerificationError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the model repository cannot be written, a disk error, ...
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
