from .datasets import DATASETS, Dataset, DatasetError, load_dataset
from .loader import BatchLoader, augment_batch
from .scenario import Scenario

__all__ = ["DATASETS", "Dataset", "DatasetError", "load_dataset", "Scenario", "BatchLoader", "augment_batch"]
