"""A folder of training images as sd-scripts' DreamBooth dataset will see it, checked before the run.

What sd-scripts does (``library/train_util.py``, see :mod:`blora_network.sdscripts.args`): it takes
the files whose extension is in ``IMAGE_EXTENSIONS`` (case-sensitive on Linux), opens each
one when it caches latents with ``load_image`` (``Image.open(...).convert("RGB")``: the pixels
are decoded, so a file that is not an image or is cut short stops the run there), reads
``<stem><caption_extension>`` as the caption (first line, UTF-8; an empty file fails an
assert) and uses ``class_tokens`` for an image without one.

Two layouts: a folder of images (one subset), or the kohya layout the kohya_ss GUI makes,
``IMAGES/10_sks dog/*.png``, read as ``config_util.generate_dreambooth_subsets_config_by_subdirs``
reads ``--train_data_dir``: each subfolder ``N_class tokens`` is a subset with N repeats and
those class tokens (the name split on ``_``: the first part must be a whole number, the rest
joined back with ``_``); other subfolders are ignored with a warning, files beside them are not read.

Sizes: with the recipe's bucketing (``enable_bucket``, resolution 1024, buckets 512-2048 px in
steps of 64, no ``bucket_no_upscale``), ``BucketManager.select_bucket`` picks the bucket of the
nearest aspect ratio and scales the image to cover it: :func:`bucket_of` says by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from blora_network.errors import BLoraError

from .args import IMAGE_EXTENSIONS

__all__ = ["ImageInfo", "ImageSubset", "ImageScan", "scan_images", "SDXL_PIXELS", "CAPTION_EXTENSIONS", "BUCKETING",
           "bucket_of", "kohya_folder"]

SDXL_PIXELS = 1024 * 1024
"""SDXL's training area: sd-scripts buckets images to about this many pixels at resolution 1024."""
CAPTION_EXTENSIONS = (".txt", ".caption")
_LOWER_IMAGE = {e.lower() for e in IMAGE_EXTENSIONS}
BUCKETING = {"enable_bucket": True, "min_bucket_reso": 512, "max_bucket_reso": 2048, "bucket_reso_steps": 64}
"""The bucketing ``recipe`` writes in ``[general]``; :func:`bucket_of` sizes images with it."""


@lru_cache(maxsize=4)
def _buckets(side: int, low: int, high: int, step: int) -> tuple[tuple[int, int], ...]:
    """``model_util.make_bucket_resolutions((side, side), low, high, step)``: sorted (width, height)."""
    area = side * side
    resos = {(int(math.sqrt(area) // step) * step,) * 2}
    width = low
    while width <= high:
        height = min(high, int((area // width) // step) * step)
        if height >= low:
            resos |= {(width, height), (height, width)}
        width += step
    return tuple(sorted(resos))


def bucket_of(width: int, height: int, side: int = 1024) -> tuple[tuple[int, int], float]:
    """``(bucket, scale)``: ``BucketManager.select_bucket`` without ``bucket_no_upscale``. The bucket
    of the image's own size if there is one, else of the nearest aspect ratio (the first in sorted
    order on a tie, as numpy's argmin); the image is scaled to cover it (``scale > 1``: upscaled)."""
    resos = _buckets(side, BUCKETING["min_bucket_reso"], BUCKETING["max_bucket_reso"], BUCKETING["bucket_reso_steps"])
    aspect = width / height
    reso = (width, height) if (width, height) in resos else min(resos, key=lambda r: abs(r[0] / r[1] - aspect))
    scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
    return reso, scale


def kohya_folder(name: str) -> Optional[tuple[int, str]]:
    """``"10_sks dog"`` -> ``(10, "sks dog")`` as sd-scripts reads a subfolder name; None when the part
    before the first ``_`` is not a whole number (sd-scripts: "ignore directory without repeats")."""
    first, _, rest = name.partition("_")
    try:
        return int(first), rest
    except ValueError:
        return None


@dataclass
class ImageInfo:
    file: str
    width: Optional[int] = None
    height: Optional[int] = None
    caption_file: Optional[str] = None
    caption: Optional[str] = None
    """The first line of the caption file, as sd-scripts reads it."""
    has_token: Optional[bool] = None
    problem: Optional[str] = None
    """Why sd-scripts would fail on this file (the run stops), or None."""
    notes: list[str] = field(default_factory=list)
    class_tokens: str = ""
    """Its subset's class tokens: its caption when it has no caption file, and the token looked for."""
    upscale: float = 1.0
    """How much sd-scripts' bucketing enlarges it (1: not at all)."""


@dataclass
class ImageSubset:
    """One DreamBooth subset: a folder of images with its repeats and class tokens."""

    image_dir: str
    class_tokens: str
    num_repeats: Optional[int]
    """From the folder name (kohya layout); None for a plain folder (the recipe chooses)."""
    images: int


@dataclass
class ImageScan:
    folder: str
    caption_extension: str
    token: str
    images: list[ImageInfo]
    ignored: list[str]
    """Files and folders sd-scripts will not read (other extensions, mixed-case image extensions,
    subfolders not named ``N_tokens``), with why."""
    subsets: list[ImageSubset] = field(default_factory=list)
    kohya_layout: bool = False
    """``IMAGES/N_tokens/`` subfolders, each a subset (what ``--train_data_dir`` reads)."""

    @property
    def usable(self) -> list[ImageInfo]:
        return [i for i in self.images if i.problem is None]

    def shown(self, info: ImageInfo) -> str:
        """An image's name as the user finds it: ``cut.jpg``, or ``10_sks dog/cut.jpg`` in the kohya layout."""
        path = Path(info.file)
        return f"{path.parent.name}/{path.name}" if self.kohya_layout else path.name

    @property
    def problems(self) -> list[str]:
        return [f"{self.shown(i)} ({i.problem})" for i in self.images if i.problem]

    @property
    def small(self) -> list[ImageInfo]:
        """Images sd-scripts' bucketing enlarges (beyond rounding: more than 1%)."""
        return [i for i in self.usable if i.upscale > 1.01]

    @property
    def missing_captions(self) -> list[ImageInfo]:
        return [i for i in self.usable if i.caption_file is None]

    @property
    def without_token(self) -> list[ImageInfo]:
        return [i for i in self.usable if i.caption_file is not None and i.has_token is False]


def _read_size(path: Path) -> tuple[int, int]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow comes with the package
        raise BLoraError("reading images needs Pillow: pip install Pillow") from None
    try:
        with Image.open(path) as im:
            size = im.size
            im.convert("RGB")  # as load_image at latent caching: decodes every pixel (verify() misses a cut-off JPEG)
        return size
    except UnidentifiedImageError:
        head = path.read_bytes()[:12]
        raise ValueError(f"not an image: Pillow cannot identify it (it starts with {head!r})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"broken image: {' '.join(str(e).split()) or type(e).__name__}") from None


def _read_caption(path: Path) -> tuple[Optional[str], Optional[str]]:
    """(first line, problem): as sd-scripts' read_caption reads a caption file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, f"caption {path.name} cannot be read ({e.strerror or e})"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"caption {path.name} is not UTF-8 (sd-scripts stops on it); save it as UTF-8"
    lines = text.splitlines(keepends=True)
    if not lines:
        return None, f"caption {path.name} is empty (sd-scripts stops on an empty caption file); write a caption or delete it"
    return lines[0].strip(), None


def _choose_caption_extension(files: list[Path], requested: Optional[str]) -> str:
    if requested:
        return requested if requested.startswith(".") else "." + requested
    counts = {ext: sum(1 for f in files if f.suffix == ext) for ext in CAPTION_EXTENSIONS}
    return max(CAPTION_EXTENSIONS, key=lambda e: (counts[e], e == ".txt"))


def _describe(path: Path, token: str, caption_ext: str) -> ImageInfo:
    info = ImageInfo(file=str(path), class_tokens=token)
    try:
        info.width, info.height = _read_size(path)
    except ValueError as e:
        info.problem = str(e)
        return info
    info.upscale = bucket_of(info.width, info.height)[1]
    cap = path.with_suffix(caption_ext)
    if cap.is_file():
        info.caption_file = str(cap)
        info.caption, problem = _read_caption(cap)
        if problem:
            info.problem = problem
        else:
            info.has_token = token.lower() in info.caption.lower()
    return info


def _list(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise BLoraError(f"image folder {folder} cannot be listed ({e.strerror or e})") from None


def _read_files(files: list[Path], token: str, caption_ext: str, where: str = "") -> tuple[list[ImageInfo], list[str]]:
    images, ignored = [], []
    for path in files:
        if path.suffix in IMAGE_EXTENSIONS:
            images.append(_describe(path, token, caption_ext))
        elif path.suffix.lower() in _LOWER_IMAGE:
            ignored.append(f"{where}{path.name} (sd-scripts looks for {path.suffix.lower()} or {path.suffix.upper()} "
                           f"only: rename it to {path.stem}{path.suffix.lower()})")
        elif path.suffix not in CAPTION_EXTENSIONS and not path.name.startswith("."):
            ignored.append(f"{where}{path.name} (not an image type sd-scripts reads)")
    return images, ignored


def _kohya_subsets(root: Path, entries: list[Path]) -> list[tuple[Path, int, str]]:
    out = []
    for d in entries:
        parsed = kohya_folder(d.name) if d.is_dir() else None
        if parsed and parsed[0] >= 1:
            out.append((d, *parsed))
    return out


def scan_images(folder, *, token: str, caption_extension: Optional[str] = None) -> ImageScan:
    """Every image sd-scripts will read from ``folder``, checked: its files (a plain folder, read as an
    ``image_dir``) or, in the kohya layout, the files of each ``N_class tokens`` subfolder."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise BLoraError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise BLoraError(f"{root} is a file; give the folder that holds the training images")
    entries = _list(root)
    kohya = _kohya_subsets(root, entries)
    if not kohya:
        files = [p for p in entries if p.is_file()]
        caption_ext = _choose_caption_extension(files, caption_extension)
        images, ignored = _read_files(files, token, caption_ext)
        subsets = [ImageSubset(str(root.resolve()), token, None, len(images))]
        return ImageScan(folder=str(root.resolve()), caption_extension=caption_ext, token=token, images=images,
                         ignored=ignored, subsets=subsets)
    files_of = {d: [p for p in _list(d) if p.is_file()] for d, _, _ in kohya}
    caption_ext = _choose_caption_extension([p for fs in files_of.values() for p in fs], caption_extension)
    images, ignored, subsets = [], [], []
    for d, repeats, tokens in kohya:
        found, skipped = _read_files(files_of[d], tokens, caption_ext, where=f"{d.name}/")
        images += found
        ignored += skipped
        if found:
            subsets.append(ImageSubset(str(d.resolve()), tokens, repeats, len(found)))
        else:
            ignored.append(f"{d.name}/ (no image sd-scripts reads in it)")
    chosen = {d for d, _, _ in kohya}
    for p in entries:
        if p.name.startswith(".") or p in chosen:
            continue
        if p.is_dir():
            parsed = kohya_folder(p.name)
            why = "0 repeats: sd-scripts skips it" if parsed else "not N_class tokens: sd-scripts ignores a folder without repeats"
            ignored.append(f"{p.name}/ ({why})")
        elif p.suffix in IMAGE_EXTENSIONS:
            ignored.append(f"{p.name} (beside the N_class tokens folders: sd-scripts reads only the images inside them)")
    return ImageScan(folder=str(root.resolve()), caption_extension=caption_ext, token=token, images=images,
                     ignored=ignored, subsets=subsets, kohya_layout=True)
