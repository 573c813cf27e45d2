from ray_ad.methods.target_memory.model import TargetMemory, TargetMemoryConfig

__all__ = ["TargetMemory", "TargetMemoryConfig"]
