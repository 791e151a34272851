"""A review's image set: a folder's images or a manifest's, each problem named (a manifest's
by its line), and the per-image folders of provided paths."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from propscope._images import folder_images

__all__ = ["ImageEntry", "image_entries", "provided_folder", "provided_problems"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# At most this many problems of one kind (manifest lines, a provided path's images) are listed.
_LISTED = 10


@dataclass(frozen=True)
class ImageEntry:
    """One image of the set: its id in the reports (the path as the spec gave it) and label."""

    id: str
    path: Path
    label: int | None


def provided_folder(pattern: str, image: ImageEntry) -> Path:
    """The image's folder of provided paths: ``pattern`` with its ``{stem}`` and ``{image}``
    (the image's id without its suffix) filled in, relative to the spec file's folder."""
    image_id = str(Path(image.id).with_suffix(""))
    return Path(pattern.format(stem=image.path.stem, image=image_id))


def provided_problems(
    where: str, base: Path, pattern: str, images: Sequence[ImageEntry]
) -> list[str]:
    """Each image's provided folder (under ``base``) that cannot be used: the first one, and
    how many more."""
    failed = []
    for image in images:
        try:
            folder_images(base / provided_folder(pattern, image))
        except ValueError as error:
            failed.append(f"{where}: image {image.id!r}: {error}")
    if len(failed) > 1:
        failed[1:] = [f"{where}: and {len(failed) - 1} more images whose folder cannot be used"]
    return failed


def image_entries(folder: Path | None, manifest: Path | None) -> tuple[list[ImageEntry], list[str]]:
    """The images of ``folder`` (every PNG/JPEG under it, sorted, unlabelled) or of ``manifest``,
    and the problems of reading them."""
    if folder is not None:
        if not folder.is_dir():
            return [], [f"images.folder: {str(folder)!r} is not a folder"]
        found = sorted(file for file in folder.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES)
        entries = [ImageEntry(str(file.relative_to(folder)), file, None) for file in found]
        problems: list[str] = []
    else:
        entries, problems = _manifest_entries(manifest or Path())
    if not entries and not problems:
        problems = ["images: the image set is empty"]
    return entries, problems


def _manifest_entries(manifest: Path) -> tuple[list[ImageEntry], list[str]]:
    """The manifest's images and the problems of its lines (at most ``_LISTED``, then a count)."""
    try:
        # utf-8-sig: spreadsheets start their CSV files with a byte-order mark.
        with manifest.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file, skipinitialspace=True)
            # Each row with its line in the file (the reader skips blank lines).
            rows = [(reader.line_num, row) for row in reader]
            columns = set(rows[0][1]) if rows else set()
    except OSError as error:
        return [], [f"images.manifest: cannot read {str(manifest)!r}: {error.strerror}"]
    except (UnicodeDecodeError, csv.Error) as error:
        return [], [f"images.manifest: {manifest}: not a UTF-8 CSV file: {error}"]
    if rows and "image" not in columns:
        return [], [f"images.manifest: {manifest}: the manifest needs an 'image' column"]
    entries, problems = [], []
    seen: set[str] = set()
    for line, row in rows:
        image = (row.get("image") or "").strip()
        label_text = (row.get("label") or "").strip()
        where = f"images.manifest: {manifest}:{line}"
        path = manifest.parent / image
        if not image:
            problems.append(f"{where}: empty image")
        elif image in seen:
            problems.append(f"{where}: {image!r} is listed twice")
        elif label_text and not (label_text.isascii() and label_text.isdigit()):
            problems.append(f"{where}: label {label_text!r} is not a class index")
        elif not path.is_file():
            problems.append(f"{where}: no image at {str(path)!r}")
        else:
            entries.append(ImageEntry(image, path, int(label_text) if label_text else None))
        seen.add(image)
    if len(problems) > _LISTED:
        problems[_LISTED:] = [
            f"images.manifest: {manifest}: and {len(problems) - _LISTED} more lines with problems"
        ]
    return entries, problems
