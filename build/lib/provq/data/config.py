"""DataConfig: which images to load, at which resolution, from where."""

from __future__ import annotations

from dataclasses import dataclass

from provq.common.typed_config import check_ranges

CROPS = ("center", "random")


@dataclass
class DataConfig:
    # "emoji" (built-in), a local image folder, or a Hugging Face hub dataset name.
    dataset: str = "emoji"
    # Images are resized (shorter side) and center-cropped to resolution x resolution.
    resolution: int = 32
    # The training split's crop: "center" (as evaluation), or "random" (ADM's random_crop_arr, as
    # LlamaGen trains its tokenizer: shorter side to a random size in [R, R / 0.8], a random R x R
    # window). Both flip at random; evaluation splits are always centre-cropped.
    train_crop: str = "center"
    # Hub datasets only: the column holding the image (PIL image, bytes or path).
    image_column: str = "image"
    # Hub datasets only: the integer/ClassLabel/string label column; None = unlabelled.
    label_column: str | None = "label"
    # Hub datasets only: the configuration name passed to datasets.load_dataset.
    hub_config: str | None = None
    # Split names that the roles "train" and "test" of load_split map to
    # (an image folder with train/ and val/ sub-folders takes test_split="val").
    train_split: str = "train"
    test_split: str = "test"
    # Text file of class names, one per line: keep only these, relabelled 0..K-1 in file order.
    class_subset: str | None = None
    # DataLoader worker processes decoding images, per process (0 = decode in the main process):
    # tokenizer training, code extraction and evaluation all read images through them.
    num_workers: int = 0
    # Decode + resize the whole split once into a uint8 tensor: True, False or "auto"
    # (when it fits in under 1 GB at the target resolution).
    in_memory: bool | str = "auto"
    # Where the built-in emoji dataset is cached; None = $PROVQ_CACHE or ~/.cache/provq.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.train_crop not in CROPS:
            raise ValueError(f"train_crop must be one of {CROPS}, got {self.train_crop!r}")
        check_ranges(self, at_least_one=("resolution",), non_negative=("num_workers",))
