"""Image decoding and model preprocessing for the serving path (Pillow + numpy, no torch).

``decode_image`` turns untrusted bytes into an ``"RGB"``/``"L"`` PIL image or raises
``ImageDecodeError``; ``Preprocessor`` turns images into the float32 NCHW batch described by a
``PreprocessConfig`` (the manifest's ``preprocess`` section), matching open_clip's eval
transform for open_clip configs (``PreprocessConfig.from_open_clip``).
"""

from .config import PreprocessConfig
from .decode import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, SUPPORTED_FORMATS, decode_image
from .errors import ImageDecodeError
from .modes import to_model_mode
from .transform import Preprocessor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "SUPPORTED_FORMATS",
    "ImageDecodeError",
    "PreprocessConfig",
    "Preprocessor",
    "decode_image",
    "to_model_mode",
]
