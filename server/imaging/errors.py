"""The one exception type the imaging code raises for bad input images."""

from __future__ import annotations


class ImageDecodeError(ValueError):
    """Raised for any input that cannot be turned into an image for the model.

    Covers empty input, bytes that are not a supported image, truncated or corrupt files,
    decompression bombs, images larger than the configured limits and pixel modes that have
    no sensible RGB/grayscale reading. The message says which of these it was.

    ``index`` is the position of the offending image when it came from a batch
    (:meth:`Preprocessor.preprocess_bytes`), otherwise ``None``.
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index
