"""matryoshka2d: train, truncate (layers x dims), evaluate and search with 2D Matryoshka embedding models."""

__version__ = "0.1.0"

from matryoshka2d.errors import (  # noqa: E402
    DataFileError,
    InvalidDimError,
    InvalidInputError,
    InvalidLayersError,
    Matryoshka2dError,
    ModelLoadError,
)
from matryoshka2d.model import EmbeddingModel  # noqa: E402

__all__ = [
    "EmbeddingModel",
    "Matryoshka2dError",
    "InvalidLayersError",
    "InvalidDimError",
    "InvalidInputError",
    "ModelLoadError",
    "DataFileError",
    "__version__",
]
