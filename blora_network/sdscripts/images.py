"""A folder of training images as sd-scripts' DreamBooth dataset will see it, checked before the run.

What sd-scripts does (``library/train_util.py``, see :mod:`blora_network.sdscripts.args`): it takes
the files whose extension is in ``IMAGE_EXTENSIONS`` (case-sensitive on Linux), opens each
one when it caches latents (a file that is not an image stops the run there), reads
``<stem><caption_extension>`` as the caption (first line, UTF-8; an empty file fails an
assert) and uses ``class_tokens`` for an image without one. Sizes are read from the image
header (Pillow opens lazily; ``verify()`` checks the file's structure without decoding pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from blora_network.errors import BLoraError

from .args import IMAGE_EXTENSIONS

__all__ = ["ImageInfo", "ImageScan", "scan_images", "SDXL_PIXELS", "CAPTION_EXTENSIONS"]

SDXL_PIXELS = 1024 * 1024
"""SDXL's training area: sd-scripts buckets images to about this many pixels at resolution 1024."""
CAPTION_EXTENSIONS = (".txt", ".caption")
_LOWER_IMAGE = {e.lower() for e in IMAGE_EXTENSIONS}


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


@dataclass
class ImageScan:
    folder: str
    caption_extension: str
    token: str
    images: list[ImageInfo]
    ignored: list[str]
    """Files sd-scripts will not read (other extensions, mixed-case image extensions), with why."""

    @property
    def usable(self) -> list[ImageInfo]:
        return [i for i in self.images if i.problem is None]

    @property
    def problems(self) -> list[str]:
        return [f"{Path(i.file).name} ({i.problem})" for i in self.images if i.problem]

    @property
    def small(self) -> list[ImageInfo]:
        return [i for i in self.usable if i.width * i.height < SDXL_PIXELS]

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
            im.verify()
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
    info = ImageInfo(file=str(path))
    try:
        info.width, info.height = _read_size(path)
    except ValueError as e:
        info.problem = str(e)
        return info
    cap = path.with_suffix(caption_ext)
    if cap.is_file():
        info.caption_file = str(cap)
        info.caption, problem = _read_caption(cap)
        if problem:
            info.problem = problem
        else:
            info.has_token = token.lower() in info.caption.lower()
    return info


def scan_images(folder, *, token: str, caption_extension: Optional[str] = None) -> ImageScan:
    """Every file of ``folder`` (not its subfolders, as sd-scripts reads an image_dir) checked."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise BLoraError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise BLoraError(f"{root} is a file; give the folder that holds the training images")
    try:
        files = sorted(p for p in root.iterdir() if p.is_file())
    except OSError as e:
        raise BLoraError(f"image folder {root} cannot be listed ({e.strerror or e})") from None
    caption_ext = _choose_caption_extension(files, caption_extension)
    images, ignored = [], []
    for path in files:
        if path.suffix in IMAGE_EXTENSIONS:
            images.append(_describe(path, token, caption_ext))
        elif path.suffix.lower() in _LOWER_IMAGE:
            ignored.append(f"{path.name} (sd-scripts looks for {path.suffix.lower()} or {path.suffix.upper()} only: "
                           f"rename it to {path.stem}{path.suffix.lower()})")
        elif path.suffix not in CAPTION_EXTENSIONS and not path.name.startswith("."):
            ignored.append(f"{path.name} (not an image type sd-scripts reads)")
    return ImageScan(folder=str(root.resolve()), caption_extension=caption_ext, token=token, images=images,
                     ignored=ignored)
