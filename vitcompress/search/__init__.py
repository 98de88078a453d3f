"""``vitcompress search``: the fastest deployable stack within an accuracy budget (space, run)."""

from .run import SearchConfig, run_search
from .space import SearchSpace, load_space

__all__ = ["SearchConfig", "SearchSpace", "load_space", "run_search"]
