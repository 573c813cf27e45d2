from ray_ad.data.dataset import ImageDataset, Sample, load_samples, split_calibration, training_split, write_manifest

__all__ = ["ImageDataset", "Sample", "load_samples", "split_calibration", "training_split", "write_manifest"]
