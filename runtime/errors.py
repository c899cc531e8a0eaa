"""Typed errors a user can cause. The CLI prints their message as one line; it names the file and the fix."""


class DiffimlError(Exception):
    """Base of the runtime's errors."""


class BundleError(DiffimlError, ValueError):
    """An engine bundle that is missing, malformed, tampered with, or built for another machine."""


class ImageDecodeError(DiffimlError, ValueError):
    """An input that is not a readable image (corrupt, truncated, empty, absurdly large)."""


class BackendUnavailableError(DiffimlError, RuntimeError):
    """The requested inference backend is not installed or has no device here."""
