from ray_ad.methods.target_memory.model import LandedCells, TargetMemory, TargetMemoryConfig

__all__ = ["LandedCells", "TargetMemory", "TargetMemoryConfig"]
