"""The runtime: an NF4 base loaded once, many LoRA / DoRA adapters in one batched forward, generation.

Imports torch; never the registry's on-disk layout (it calls the Registry API).
"""

from adapterhub.runtime.base import Base, load_base
from adapterhub.runtime.merge import combine

__all__ = ["Base", "combine", "load_base"]
