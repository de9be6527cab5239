"""Built-in `emoji` dataset: Noto Color Emoji bitmaps labelled by Unicode emoji group, cached."""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from provq.common.errors import MissingFileError
from provq.common.hashing import files_digest

from .images import WHITE, in_test_split, open_rgb

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_DATA_PATH = Path("/usr/share/unicode/emoji/emoji-data.txt")
APT_FIX = "sudo apt-get install fonts-noto-color-emoji unicode-data"
CACHE_VERSION = "v1"  # bump when the build changes, so stale caches are not reused
ZWJ, VS16 = 0x200D, 0xFE0F
SKIN_TONES = range(0x1F3FB, 0x1F400)
COMPONENT = "Component"  # emoji-test.txt's own group for skin tones and hair styles


def check_inputs() -> None:
    missing = [str(p) for p in (FONT_PATH, EMOJI_TEST_PATH, EMOJI_DATA_PATH) if not p.is_file()]
    if missing:
        raise MissingFileError(
            f"the built-in emoji dataset needs {', '.join(missing)}; install it with: {APT_FIX}")


def read_groups(path: Path = EMOJI_TEST_PATH) -> tuple[list[str], dict[tuple, str]]:
    """Group names in file order, and sequence (without FE0F) -> group."""
    names, groups, group = [], {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            names.append(group)
        elif line and not line.startswith("#") and ";" in line:
            codes = tuple(int(c, 16) for c in line.split(";")[0].split())
            groups.setdefault(tuple(c for c in codes if c != VS16), group)
    return names, groups


def read_components(path: Path = EMOJI_DATA_PATH) -> set[int]:
    """Code points with the Emoji_Component property (keycap bases, regional indicators...)."""
    components = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = [f.strip() for f in line.split("#")[0].split(";")]
        if len(fields) == 2 and fields[1] == "Emoji_Component":
            first, _, last = fields[0].partition("..")
            components.update(range(int(first, 16), int(last or first, 16) + 1))
    return components


def glyph_sequences(font) -> dict[str, set[tuple[int, ...]]]:
    """Glyph name -> every code point sequence that renders it (cmap + GSUB ligatures).

    Noto also lists each ZWJ sequence reversed (for right-to-left shaping), so a
    glyph usually has two candidates; the caller picks the one Unicode knows.
    """
    cmap = font.getBestCmap()
    codepoint = {glyph: cp for cp, glyph in cmap.items()}
    sequences = collections.defaultdict(set)
    for cp, glyph in cmap.items():
        sequences[glyph].add((cp,))
    for lookup in font["GSUB"].table.LookupList.Lookup:
        for subtable in lookup.SubTable:
            for first, ligatures in getattr(subtable, "ligatures", {}).items():
                for ligature in ligatures:
                    glyphs = [first, *ligature.Component]
                    if all(g in codepoint for g in glyphs):
                        sequences[ligature.LigGlyph].add(tuple(codepoint[g] for g in glyphs))
    return sequences


def _vote_group(sequence, groups, group_order):
    """Group of a sequence newer than emoji-test.txt (Noto ships Emoji 15.1 and
    non-RGI subdivision flags): the majority group of its ZWJ elements, where
    Symbols elements (the arrows, gender signs of 'facing right', 'man: ...')
    count only if nothing else does; ties go to the group listed first."""
    elements, current = [], []
    for cp in (*sequence, ZWJ):
        if cp == ZWJ:
            elements.append(tuple(current))
            current = []
        elif cp not in SKIN_TONES and not 0xE0020 <= cp <= 0xE007F:  # tags: flag subdivisions
            current.append(cp)
    votes = [groups[e] for e in elements if e in groups]
    if any(v != "Symbols" for v in votes):
        votes = [v for v in votes if v != "Symbols"]
    counts = collections.Counter(votes)
    return min(counts, key=lambda g: (-counts[g], group_order.index(g))) if counts else None


def label_glyph(candidates, groups, group_order, components):
    """(sequence, group, rule) for one glyph; rule says how the group was found."""
    stripped = sorted(tuple(c for c in s if c != VS16) for s in candidates)
    exact = [s for s in stripped if s in groups]
    if exact:
        return exact[0], groups[exact[0]], "emoji-test"
    sequence = stripped[0]
    if len(sequence) == 1 and sequence[0] in components:
        return sequence, COMPONENT, "emoji-data component"
    # The vote counts elements, so the reversed twin gives the same answer.
    group = _vote_group(sequence, groups, group_order)
    return sequence, group, "zwj-element vote" if group else "unmatched"


def render_glyph(png: bytes) -> Image.Image:
    """CBDT bitmap (136x128 RGBA or palette PNG) -> RGB on white, padded to a square."""
    image = open_rgb(png)
    side = max(image.size)
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def emoji_records() -> tuple[list[dict], list[str]]:
    """One record per CBDT bitmap: image (PIL), label, codepoints, glyph; plus label names."""
    from fontTools.ttLib import TTFont

    check_inputs()
    group_order, groups = read_groups()
    components = read_components()
    font = TTFont(str(FONT_PATH))
    sequences = glyph_sequences(font)
    records, rules = [], collections.Counter()
    strike = font["CBDT"].strikeData[0]  # Noto has one strike: 109 ppem, 136x128 bitmaps
    for glyph, bitmap in strike.items():
        sequence, group, rule = label_glyph(
            sequences.get(glyph) or {()}, groups, group_order, components)
        rules[rule] += 1
        records.append({"image": render_glyph(bitmap.imageData), "group": group,
                        "codepoints": " ".join(f"{cp:04X}" for cp in sequence) or glyph,
                        "glyph": glyph})
    # Glyphs no rule places (none in Debian 12's font) get a clearly named extra
    # class rather than being dropped, so the image count never silently shrinks.
    names = [g for g in group_order if any(r["group"] == g for r in records)]
    if rules["unmatched"]:
        names.append("Unmatched")
    for record in records:
        record["label"] = names.index(record.pop("group") or "Unmatched")
    logging.info("emoji labels by rule: %s", dict(rules))
    return records, names


def input_fingerprint() -> str:
    """Hash of the font and Unicode files: a package upgrade builds a fresh cache."""
    return files_digest((FONT_PATH, EMOJI_TEST_PATH, EMOJI_DATA_PATH), prefix=CACHE_VERSION)[:12]


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("PROVQ_CACHE") or Path.home() / ".cache" / "provq")


def build_emoji(target: Path):
    """Build the DatasetDict {train, test} and save it atomically at `target`."""
    import datasets

    started = time.perf_counter()
    records, names = emoji_records()
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=names),
        "codepoints": datasets.Value("string"), "glyph": datasets.Value("string"),
        "width": datasets.Value("int32"), "height": datasets.Value("int32")})
    splits = {"train": [], "test": []}
    for record in records:
        record["width"], record["height"] = record["image"].size
        # Keyed on the code points, not the glyph id, so the split survives font rebuilds.
        split = "test" if in_test_split(record["codepoints"]) else "train"
        splits[split].append(record)
    dataset = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in features},
                                         features=features)
        for name, rows in splits.items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a killed build never leaves a half cache.
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        dataset.save_to_disk(str(scratch / "dataset"))
        os.rename(scratch / "dataset", target)
    except OSError:
        if not target.is_dir():  # another process finishing first is fine
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logging.info("built emoji dataset (%d images) in %.1f s at %s",
                 len(records), time.perf_counter() - started, target)


def load_emoji(cache_dir: str | None = None):
    """The cached emoji DatasetDict, built on first use."""
    import datasets

    check_inputs()
    target = cache_root(cache_dir) / f"emoji-{CACHE_VERSION}-{input_fingerprint()}"
    if not target.is_dir():
        build_emoji(target)
    return datasets.load_from_disk(str(target))
