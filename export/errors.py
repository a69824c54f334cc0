"""Errors the export reports as one clear line instead of a traceback (torch-free to import)."""


class CheckpointError(RuntimeError):
    """The checkpoint cannot be obtained or is not a MobileSAM (vit_t) state_dict."""


class VerificationError(RuntimeError):
    """An exported model disagrees with PyTorch beyond the stated tolerance."""
