"""User data: `.npz` files and image folders, preprocessed as the model expects (`config.Preprocess`),
as one `DataSet` (inputs, labels, classes) with seeded `split` and `batches`. numpy only; images
decoded with Pillow when there are any, and only those a selection reads (`open_data(...).read(index)`)."""

from ..config import Preprocess
from .dataset import DataSet, from_batches, split_indices
from .load import DataFile, load_data, load_for_model, open_data, open_for_model

__all__ = ["DataFile", "DataSet", "Preprocess", "from_batches", "load_data", "load_for_model", "open_data",
           "open_for_model", "split_indices"]
