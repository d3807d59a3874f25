from .datasets import DATASETS, Dataset, DatasetError, DatasetNotHere, load_dataset
from . import imagefolder as _imagefolder  # noqa: F401,E402  (registers data.name=imagefolder)
from .loader import BatchLoader, augment_batch
from .scenario import Scenario

__all__ = ["DATASETS", "Dataset", "DatasetError", "DatasetNotHere", "load_dataset", "Scenario", "BatchLoader", "augment_batch"]
