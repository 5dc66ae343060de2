"""Engine core: block pool, radix prefix cache, KV cache manager, scheduler. Pure Python."""

from kvforge.core.block_pool import BlockPool
from kvforge.core.kv_cache_manager import KVCacheManager
from kvforge.core.prefix_cache import RadixPrefixCache
from kvforge.core.scheduler import Scheduler
from kvforge.core.step_io import ModelRunnerOutput, SchedulerOutput

__all__ = [
    "BlockPool",
    "KVCacheManager",
    "RadixPrefixCache",
    "ModelRunnerOutput",
    "Scheduler",
    "SchedulerOutput",
]
