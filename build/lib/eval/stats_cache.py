"""Reference statistics computed once per dataset and protocol, reused from the user's cache folder
(as clean-fid keeps its reference statistics): keyed by the dataset's fingerprint (data/: what its
pixels depend on) and the extractor's checksum and protocol, so stale statistics are never reused."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from eval.compute import EvalSetup, StatsResult, source_stats
from eval.fid import STATS_FORMAT, FeatureStats, load_stats, save_stats
from eval.inception import PROTOCOL
from provq.common.errors import FormatError
from provq.common.hashing import digest
from provq.data.emoji import cache_root

logger = logging.getLogger(__name__)
DISABLE_VARIABLE = "PROVQ_NO_STATS_CACHE"


def cache_path(fingerprint: str, checksum: str) -> Path:
    """$PROVQ_STATS_CACHE, else <the project's cache folder>/fid_stats, then a file per key."""
    key = digest(fingerprint, checksum, json.dumps(PROTOCOL, sort_keys=True), STATS_FORMAT)
    folder = os.environ.get("PROVQ_STATS_CACHE") or cache_root(None) / "fid_stats"
    return Path(folder) / f"{key[:32]}.npz"


def cached(source, checksum: str) -> FeatureStats | None:
    """The cached statistics of a DatasetSource's images under this extractor, if any."""
    if os.environ.get(DISABLE_VARIABLE):
        return None
    path = cache_path(source.dataset.fingerprint, checksum)
    if not path.is_file():
        return None
    try:
        stats = load_stats(path)
    except FormatError as error:  # our own cache, damaged (a full disk, a kill): computed again
        logger.warning("ignoring a damaged statistics cache file (%s); computing the statistics again", error)
        return None
    logger.info("statistics of %s from the cache: %s", source.name, path)
    return stats


def store(source, stats: FeatureStats, skipped: int) -> None:
    """Cache a split's statistics (main process; a split with unreadable files is not cached)."""
    if skipped == 0 and not os.environ.get(DISABLE_VARIABLE):
        save_stats(stats, cache_path(source.dataset.fingerprint, stats.checksum))


def reference_stats(source, setup: EvalSetup, desc: str = "reference") -> StatsResult:
    """Statistics of a dataset split (an eval.inputs.DatasetSource): cached, or computed and cached.
    The Inception Score is never cached: a model with the classifier layer always computes."""
    found = None if setup.model.fc is not None else cached(source, setup.model.checksum)
    if found is not None:
        return StatsResult(found, None, 0, cached=True)
    result = source_stats(source, setup, desc)
    if setup.procs.is_main and setup.model.fc is None:
        store(source, result.stats, result.skipped)
    return result
