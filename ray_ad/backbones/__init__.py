from ray_ad.backbones.extractor import BackboneConfig, FeatureExtractor

__all__ = ["BackboneConfig", "FeatureExtractor"]
