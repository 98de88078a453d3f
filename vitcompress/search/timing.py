"""The search's one timing of each point: alternately with the target's dense model, in this process, at the batch
size. The figure is written into the point's sweep record, which every report of the search folder reads."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..bench import compare, model_runner
from ..io import atomic_write_json
from ..models import data_config
from ..sweep.config import Point, SweepConfig, dense_point
from ..sweep.run import bench_for, build_point, deploy
from .config import SearchConfig, point_runtime


class Timer:
    """Times stacks in the target runtime against the target's dense model (contention and drift hit both sides
    alike), and records each figure once in the point's sweep record."""

    def __init__(self, cfg: SearchConfig, full: SweepConfig, base: Any, images: Any):
        self.cfg, self.full, self.base, self.images = cfg, full, base, images
        self.bench, self.size = full.bench_config(), data_config(base)["input_size"]
        self.repeat = max(3 * cfg.repeat, 15)
        self.seconds = 0.0  # how long the last timing took (the budget's estimate of a trial's timing)
        self._tmp = tempfile.TemporaryDirectory(prefix="vitcompress-search-")
        self._kept: dict[str, Any] = {}
        self._dense_ms: float | None = None
        self.dense = self._runner(dense_point(point_runtime(cfg.target)), "dense")

    def _runner(self, p: Point, key: str) -> Any:
        if key in self._kept:
            return self._kept[key]
        work = Path(self._tmp.name) / key
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        model = deploy(build_point(self.base, p.stack, self.full), p, self.full, work)
        run = model_runner(model, self.cfg.batch_size, self.size, bench_for(p, self.full), self.images)
        if key != "trial":  # the dense model, the anchor and the peer: built once
            self._kept[key] = run
        return run

    def _time(self, p: Point, key: str) -> tuple[dict[str, float], Any]:
        t0 = time.monotonic()
        run = self._runner(p, key)
        r = compare(self.dense, run, device=self.bench.resolve_device(), warmup=self.bench.warmup,
                    warmup_s=self.bench.warmup_s, repeat=self.repeat)
        self.seconds = time.monotonic() - t0
        self._dense_ms = r["a_median_ms"]
        return r, run

    def record(self, p: Point, rec: dict[str, Any], pdir: Path, *, key: str = "trial",
               self_anchor: bool = False) -> dict[str, Any]:
        """``rec`` with its speed at the batch size (x the target's dense model), timed now unless it has one;
        written back to ``pdir``. ``self_anchor``: ``p`` is the dense model itself (1.0 by definition; its latency
        is the last timing's dense median)."""
        bs = str(self.cfg.batch_size)
        if bs in (rec.get("speedup") or {}):
            return rec
        if self_anchor:
            if self._dense_ms is None:  # resumed: no timing in this process yet
                self._time(p, "dense")
            r = {"a_median_ms": self._dense_ms, "b_median_ms": self._dense_ms, "b_p95_ms": None, "speedup": 1.0}
            dtype = getattr(self.dense, "dtype", None)
        else:
            r, run = self._time(p, key)
            dtype = getattr(run, "dtype", None)
        rec = {**rec, "latency_ms": {bs: {"median": r["b_median_ms"], "p95": r["b_p95_ms"]}},
               "base_latency_ms": {bs: r["a_median_ms"]}, "speedup": {bs: r["speedup"]},
               "dtype": {bs: None if dtype is None else str(dtype)},
               "throughput": self.cfg.batch_size / (r["b_median_ms"] / 1e3), "timed_against": "dense",
               "timing_repeat": self.repeat}
        atomic_write_json(pdir / f"{rec['id']}.json", rec)
        return rec
