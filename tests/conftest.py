"""Shared fixtures: a tiny labelled image folder for the training-script tests."""

import pytest
from training_helpers import make_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """96 PNGs of 16 px in 4 class folders (about 88 train, 8 test after the hash split)."""
    return make_image_folder(tmp_path_factory.mktemp("images"))
