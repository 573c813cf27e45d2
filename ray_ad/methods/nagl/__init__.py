from ray_ad.methods.nagl.config import NAGLConfig
from ray_ad.methods.nagl.model import NAGL

__all__ = ["NAGL", "NAGLConfig"]
