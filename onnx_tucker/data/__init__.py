"""User data: `.npz` files and image folders, preprocessed as the model expects (`config.Preprocess`),
as one `DataSet` (inputs, labels, classes). numpy only; images decoded with Pillow when there are any."""

from ..config import Preprocess
from .dataset import DataSet, load_data

__all__ = ["DataSet", "Preprocess", "load_data"]
