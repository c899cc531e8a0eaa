"""The torch-free DiffIML runtime: ``Localizer.open(bundle).localize(image)``."""

from diffiml.runtime.errors import BackendUnavailableError, BundleError, DiffimlError, ImageDecodeError
from diffiml.runtime.localizer import LocalizationResult, Localizer

__all__ = ["BackendUnavailableError", "BundleError", "DiffimlError", "ImageDecodeError", "LocalizationResult",
           "Localizer"]
