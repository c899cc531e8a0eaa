"""Typed errors a user can cause. The CLI prints their message as one line; it names the file and the fix."""


class DiffimlError(Exception):
    """Base of the runtime's errors."""


class BundleError(DiffimlError, ValueError):
    """An engine bundle that is missing, malformed, tampered with, or built for another machine."""


class ImageDecodeError(DiffimlError, ValueError):
    """An input that is not a readable image (corrupt, truncated, empty, absurdly large)."""


class BackendUnavailableError(DiffimlError, RuntimeError):
    """The requested inference backend is not installed or has no device here."""


def one_line(exc: BaseException, last: bool = False, limit: int = 300) -> str:
    """An exception as one line for a user: the first non-empty line of its message (``last``: the last one, where a
    library puts its own reason at the end, as OpenCV does), else its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0])[:limit] if lines else type(exc).__name__
