from ray_ad.methods.ref_cfa.model import REFCFA, REFCFAConfig

__all__ = ["REFCFA", "REFCFAConfig"]
