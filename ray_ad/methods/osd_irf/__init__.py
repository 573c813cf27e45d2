from ray_ad.methods.osd_irf.model import OSDIRF, OSDIRFConfig

__all__ = ["OSDIRF", "OSDIRFConfig"]
