from ray_ad.methods.ref_cfa.config import REFCFAConfig
from ray_ad.methods.ref_cfa.model import REFCFA

__all__ = ["REFCFA", "REFCFAConfig"]
