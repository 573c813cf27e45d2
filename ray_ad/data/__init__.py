from ray_ad.data.dataset import ImageDataset, load_samples, split_calibration, training_split, write_manifest
from ray_ad.data.sample import UNLABELED, Sample, dataset_kind, is_folder_uri

__all__ = [
    "UNLABELED", "ImageDataset", "Sample", "dataset_kind", "is_folder_uri", "load_samples", "split_calibration",
    "training_split", "write_manifest",
]
