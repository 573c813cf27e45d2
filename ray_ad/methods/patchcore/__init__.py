from ray_ad.methods.patchcore.model import PatchCore, PatchCoreConfig

__all__ = ["PatchCore", "PatchCoreConfig"]
