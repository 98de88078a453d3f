"""``vitcompress search``: the fastest deployable stack within an accuracy budget (config, space, run)."""

from .config import Metric, SearchConfig
from .run import run_search
from .space import SearchSpace, load_space

__all__ = ["Metric", "SearchConfig", "SearchSpace", "load_space", "run_search"]
