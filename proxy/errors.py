"""What can go wrong with a request, raised where it happens; `proxy.problems` maps each to
an HTTP status and an RFC 9457 problem document, in one place.

Every error has a stable machine-readable `code` (part of the API: clients branch on it), a
`detail` for people, and optional `extensions` that go into the problem body as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """A request the service refuses or cannot complete."""

    code: ClassVar[str] = "service_error"

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions


# --- the request itself ---------------------------------------------------------------------


class ImageRequired(ServiceError):
    """Neither or both of an upload and an image_id."""

    code = "image_required"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnknownImageId(ServiceError):
    """The image_id is not (or no longer) cached."""

    code = "unknown_image_id"


class UnknownMaskId(ServiceError):
    """The mask_id is not (or no longer) kept."""

    code = "unknown_mask_id"


class InvalidParameter(ServiceError, ValueError):
    """A setting outside its documented range; `field` names it."""

    code = "invalid_parameter"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)
        self.field = field


class TooMuchWork(ServiceError, ValueError):
    """A request whose computed cost is over its limit (segment-everything's prompt count)."""

    code = "too_much_work"


class PromptError(ServiceError, ValueError):
    """A prompt the API refuses; the code says what is wrong, `location` where."""

    def __init__(self, code: str, message: str, location: str = "prompts") -> None:
        super().__init__(f"{location}: {message}")
        self.code = code  # one of the prompt codes of the README's error table
        self.location = location


# --- the image ------------------------------------------------------------------------------


class ImageError(ServiceError, ValueError):
    """An upload that is not a usable image."""

    code = "invalid_image"


class EmptyImage(ImageError):
    code = "empty_file"


class UnsupportedImageFormat(ImageError):
    code = "unsupported_media_type"


class ImageTooLarge(ImageError):
    code = "image_too_large"


class CorruptImage(ImageError):
    code = "corrupt_image"


class DegenerateImage(ImageError):
    """Too thin to resize: less than one pixel wide at the encoder's input size."""

    code = "degenerate_image"


# --- the proxy's own limits -------------------------------------------------------------------


class Overloaded(ServiceError):
    """No room for the request's work right now (admission control): retry later."""

    code = "overloaded"


class DeadlineExceeded(ServiceError):
    """The request ran past its overall deadline; its remaining work was dropped."""

    code = "deadline_exceeded"


class ShuttingDown(ServiceError):
    """The proxy stopped while the request was still running past its drain time."""

    code = "shutting_down"


# --- Triton -----------------------------------------------------------------------------------


class TritonUnavailable(ServiceError):
    """Triton is unreachable, not ready, or refuses work (its queue is full): retry later."""

    code = "triton_unavailable"


class TritonTimeout(ServiceError):
    """A Triton call missed its deadline."""

    code = "triton_timeout"


class TritonFailed(ServiceError):
    """Triton answered with an error that retrying will not fix."""

    code = "triton_error"
