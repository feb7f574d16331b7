"""Applications of distilled sets (the course's Task 1 item 4): class-incremental continual learning with a
memory of synthetic or real exemplars, and neural architecture search with a proxy set."""
from ddlib.apps.continual import (
    ContinualResult,
    class_order,
    class_steps,
    compare_memories,
    continual_learning,
)
from ddlib.apps.nas import NASResult, convnet_grid, search, spearman, validation_split

__all__ = ["ContinualResult", "NASResult", "class_order", "class_steps", "compare_memories", "continual_learning",
           "convnet_grid", "search", "spearman", "validation_split"]
