from ray_ad.methods.gaussian.model import GaussianConfig, GaussianDetector

__all__ = ["GaussianConfig", "GaussianDetector"]
