"""The search's Optuna study: created or joined in its storage, the processes that share it waited for, and the
sweep index of every point its trials measured (those of other processes included)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UserError
from ..io import atomic_write_json
from ..sweep.config import SweepConfig
from ..sweep.run import point_finished
from .config import SearchConfig


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("vitcompress search needs Optuna: pip install 'vitcompress[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(optuna: Any, cfg: SearchConfig, out: Path) -> Any:
    """The study: created or joined in the storage (SQLite in the folder by default)."""
    modern = hasattr(optuna.trial.Trial, "set_constraint")
    # the drop over budget is a constraint (<= 0 is feasible): Optuna 5 records it on the trial, older ones ask;
    # workers sample with their own seeds (the same seed would propose the same stacks in every process)
    seed = cfg.seed if not cfg.worker else None
    sampler = optuna.samplers.TPESampler(seed=seed, **({} if modern else {
        "constraints_func": lambda t: [t.user_attrs.get("violation", 0.0)]}))
    # heartbeats: a trial whose process died (a killed search) is failed once its heartbeat is 2 minutes old, by
    # whichever process of this study starts a trial next; live trials of other processes stay
    url = cfg.storage or f"sqlite:///{out / 'study.db'}"
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
        except (ImportError, ModuleNotFoundError) as e:
            raise ConfigError(f"storage {url.split('://')[0]}:// needs its database driver: {e}") from None
        except Exception as e:  # SQLAlchemy's OperationalError and friends: an unreachable server
            raise UserError(f"cannot open the study storage {url}: {str(e).splitlines()[0]}") from None
    return optuna.create_study(study_name="search", storage=storage, load_if_exists=True, direction="maximize",
                               sampler=sampler)


def wait_for_others(study: Any, until: float, log) -> None:
    """Let the trials other processes (``--worker``) are still running finish, within the budget."""
    state = optuna_module().trial.TrialState.RUNNING
    told = False
    while time.monotonic() < until and study.get_trials(deepcopy=False, states=(state,)):
        if not told:
            log("search: waiting for the workers' running trials")
            told = True
        time.sleep(2)


def finished_trials(study: Any) -> list[dict[str, Any]]:
    """Every finished trial's record, from the study (so that processes sharing it, and resumed runs, see them all)."""
    return [t.user_attrs["entry"] for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
            if "entry" in t.user_attrs and t.user_attrs["entry"].get("stage") != "running"]


def write_sweep_index(out: Path, full: SweepConfig, base_key: str, study: Any, cfg: SearchConfig) -> None:
    """The sweep index of the measured points (the anchor, the dense target, every fully measured trial, those of
    other processes included), so that the sweep's report, Pareto picture and ``vitcompress report`` read the
    search folder."""
    for t in study.get_trials(deepcopy=False):
        rec = t.user_attrs.get("record")
        if rec and not point_finished(out / "points" / f"{rec['id']}.json"):  # measured by another process
            atomic_write_json(out / "points" / f"{rec['id']}.json", rec)
    recs = []
    for f in sorted((out / "points").glob("*.json")):
        try:
            recs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    recs = [r for r in recs if "speedup" in r or r.get("status") != "ok"]  # a point is reported once it is timed
    recs.sort(key=_order)
    config = {**full.to_dict(), "anchor": f"the dense {cfg.target} model", "reference_batch": cfg.batch_size}
    atomic_write_json(out / "sweep.json", {"config": config, "base_key": base_key, "command": None,
                                           "points": [{"id": r["id"], "name": r["name"], "family": r.get("family")}
                                                      for r in recs]})


def _order(rec: dict[str, Any]) -> tuple[int, int]:
    """The report's row order: the base, the dense target, the peer, then the trials by number."""
    name = rec.get("name", "")
    if name.startswith("trial "):
        return 3, int(name.split()[1])
    return (0 if rec.get("family") == "base" else 1 if name.startswith("dense") else 2), 0
