"""Shared fixtures: a tiny labelled image folder for the training-script tests."""

import os
import tempfile

import pytest
from training_helpers import make_image_folder

# Statistics cached by one test must not answer another's (or a user's) question: a fresh cache
# folder for this session, inherited by the commands the tests start.
os.environ["PROVQ_STATS_CACHE"] = tempfile.mkdtemp(prefix="provq-stats-cache-")


def pytest_collection_modifyitems(config, items):
    """The slow tests first (stable: each group keeps its order): under pytest-xdist (`make test`) the
    long ones start at once and the short ones fill the workers' gaps, instead of one long test
    starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """96 PNGs of 16 px in 4 class folders (about 88 train, 8 test after the hash split)."""
    return make_image_folder(tmp_path_factory.mktemp("images"))
