"""Turn every file in `<data_path>/images` into a plain RGB JPG that every stage reads the same way.

    python -m src.etl.preprocess
    python -m src.etl.preprocess data_path=data/mine preprocess.workers=4

- Images (jpg/jpeg/png/bmp/tif/tiff/webp/heic/heif, any letter case) become RGB JPGs with the EXIF rotation
  baked in (labels are taken to be drawn on the image as viewers show it, i.e. rotated, which is what
  labelling tools show). Grayscale, CMYK, 16-bit and palette images become RGB; transparency is composited
  on white (transparent pixels often store black, so dropping alpha could black out the picture).
  a.png -> a.jpg keeps labels/a.txt (same stem). A JPG that needs work keeps its own file name.
- Every PDF page becomes <stem>_p001.jpg, <stem>_p002.jpg, ... (rendered at preprocess.pdf_dpi; page images
  get no labels).
- JPGs already fine (RGB, no EXIF rotation) are left untouched.
- Nothing is deleted: each converted original is MOVED to preprocess.originals_dir keeping its path relative
  to data_path (data/x/images/a.png -> data/x/originals/images/a.png). Delete that folder yourself once happy.
- Never overwrites: a.png next to an existing a.jpg (or any output name already taken) is reported and left.
- Unreadable files are reported by name and left in place; the stage carries on. Other file types are listed.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig
from PIL import Image

from src.common.config import stage_main
from src.common.errors import ConfigError, UserError
from src.common.images import (
    IMAGE_EXTS,
    ImageReadError,
    exif_orientation,
    open_image,
    parallel_map,
    read_error,
    read_image_rgb,
    upright_rgb,
)
from src.common.io import atomic_write
from src.etl.labels import images_dir, label_path_for

JPG_EXTS = frozenset({".jpg", ".jpeg"})
PDF_EXT = ".pdf"

CONVERTED, SKIPPED, UNREADABLE, CLASH = "converted", "skipped", "unreadable", "clash"


@dataclass
class Outcome:
    source: Path
    status: str  # converted | skipped | unreadable | clash
    outputs: list[Path] = field(default_factory=list)
    message: str = ""


@dataclass
class Summary:
    outcomes: list[Outcome]
    ignored: list[Path]  # files in images/ that are neither images nor PDFs

    def by_status(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    def text(self) -> str:
        converted = self.by_status(CONVERTED)
        pages = sum(len(o.outputs) for o in converted if o.source.suffix.lower() == PDF_EXT)
        lines = [
            f"converted {len(converted)} file(s) ({pages} PDF page image(s)), skipped {len(self.by_status(SKIPPED))} "
            f"already-fine JPG(s), {len(self.by_status(UNREADABLE))} unreadable, {len(self.by_status(CLASH))} name clash(es), "
            f"{len(self.ignored)} other file(s) ignored"
        ]
        for status in (UNREADABLE, CLASH):
            lines += [f"  {status}: {o.source}: {o.message}" for o in self.by_status(status)]
        lines += [f"  ignored (not an image or PDF): {p}" for p in self.ignored]
        return "\n".join(lines)


class Converter:
    """Writes the converted JPG(s) for one source and moves the source aside; shared settings live here."""

    def __init__(self, data_path: Path, originals_dir: Path, jpg_quality: int, pdf_dpi: int):
        self.data_path, self.originals_dir = data_path, originals_dir
        self.jpg_quality, self.pdf_dpi = jpg_quality, pdf_dpi

    def original_destination(self, source: Path) -> Path:
        try:
            relative = source.relative_to(self.data_path)
        except ValueError:
            relative = Path(source.name)
        return self.originals_dir / relative

    def jpg_bytes(self, rgb) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(
            buffer, format="JPEG", quality=self.jpg_quality
        )  # no EXIF: rotation is baked in
        return buffer.getvalue()

    def convert_image(self, source: Path, target: Path) -> Outcome:
        """One image -> target JPG. target == source for a JPG rewritten in place."""
        destination = self.original_destination(source)
        if destination.exists():
            return Outcome(
                source, CLASH, message=f"{destination} already exists; not moving the original over it"
            )
        try:
            if source.suffix.lower() in JPG_EXTS:
                # Decoded in full, not judged by its header: a truncated JPG has a fine header.
                image = open_image(source)
                if image.mode == "RGB" and exif_orientation(image) == 1:
                    return Outcome(source, SKIPPED)
                rgb = upright_rgb(image)
            else:
                rgb = read_image_rgb(source)
        except (ImageReadError, OSError, SyntaxError, ValueError) as err:
            return Outcome(source, UNREADABLE, message=str(read_error(source, err)))
        data = self.jpg_bytes(rgb)
        if target != source and target.exists():  # appeared since planning: never overwrite
            return Outcome(source, CLASH, message=f"{target.name} already exists")
        self.write_then_move_aside(source, {target: data})
        return Outcome(source, CONVERTED, [target])

    def convert_pair(self, source_and_target: tuple[Path, Path]) -> Outcome:
        return self.convert_image(*source_and_target)

    def write_then_move_aside(self, source: Path, outputs: dict[Path, bytes]) -> None:
        """Move the source aside and write the outputs; on failure put the source back (nothing lost)."""
        destination = self.original_destination(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, destination)
        try:
            for path, data in outputs.items():
                atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
        except BaseException:
            for path in outputs:
                if path != source and path.exists():
                    path.unlink()
            shutil.move(destination, source)
            raise

    def render_pdf(self, source: Path, targets: list[Path]) -> Outcome:
        """Every page of a PDF -> one JPG each (PyMuPDF is not thread-safe: call from one thread only)."""
        import pymupdf

        if self.original_destination(source).exists():
            return Outcome(source, CLASH, message=f"{self.original_destination(source)} already exists")
        outputs: dict[Path, bytes] = {}
        try:
            with pymupdf.open(source) as document:
                for page, target in zip(document, targets, strict=True):
                    pixmap = page.get_pixmap(dpi=self.pdf_dpi, alpha=False, colorspace=pymupdf.csRGB)
                    rgb = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
                    buffer = io.BytesIO()
                    rgb.save(buffer, format="JPEG", quality=self.jpg_quality)
                    outputs[target] = buffer.getvalue()
        except Exception as err:  # PyMuPDF raises its own types for damaged files
            return Outcome(source, UNREADABLE, message=f"cannot render PDF: {err}")
        self.write_then_move_aside(source, outputs)
        return Outcome(source, CONVERTED, list(outputs))


def pdf_page_count(path: Path) -> int | str:
    """Number of pages, or the error message for an unreadable PDF."""
    import pymupdf

    try:
        with pymupdf.open(path) as document:
            return document.page_count
    except Exception as err:
        return f"cannot open PDF: {err}"


def plan_targets(
    images: list[Path], pdfs: dict[Path, int], taken: set[str]
) -> tuple[dict[Path, list[Path]], list[Outcome]]:
    """Output paths per source, and clash outcomes for sources whose output name is taken.

    Names compare case-insensitively (A.jpg and a.jpg are one file on macOS/Windows file systems).
    """
    by_stem: dict[str, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.stem.lower(), []).append(path)
    targets: dict[Path, list[Path]] = {}
    clashes: list[Outcome] = []
    for path in images:
        if path.suffix.lower() in JPG_EXTS:
            targets[path] = [path]  # rewritten in place if needed
            continue
        target = path.with_suffix(".jpg")
        others = [p.name for p in by_stem[path.stem.lower()] if p != path]
        if others:
            clashes.append(
                Outcome(
                    path,
                    CLASH,
                    message=f"would become {target.name}, but {', '.join(others)} has the same name",
                )
            )
        else:
            targets[path] = [target]
            taken.add(target.name.lower())
    for path, pages in pdfs.items():
        page_targets = [path.with_name(f"{path.stem}_p{i:03d}.jpg") for i in range(1, pages + 1)]
        used = [t.name for t in page_targets if t.name.lower() in taken]
        if used:
            clashes.append(
                Outcome(path, CLASH, message=f"page image name(s) already taken: {', '.join(used[:5])}")
            )
        else:
            targets[path] = page_targets
            taken.update(t.name.lower() for t in page_targets)
    return targets, clashes


def refuse_unwritable(folder: Path, originals: Path) -> None:
    """Stop before touching anything when images/ or the originals folder cannot be written.

    Probed by creating a file: os.access and mode bits say nothing about read-only mounts, and root passes them.
    """
    existing = originals
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # originals_dir is created later: its nearest existing parent must take it
    for place, why in (
        (folder, "converted images are written there"),
        (existing, "originals are moved there"),
    ):
        try:
            with tempfile.NamedTemporaryFile(dir=place, prefix=".preprocess-probe-"):
                pass
        except OSError as err:
            raise UserError(
                f"cannot write in {place} ({err.strerror or err}); {why}. Nothing was changed: make it writable "
                "(or copy the data set somewhere writable) and run preprocess again"
            ) from err


def run(cfg: DictConfig) -> Summary:
    data_path = Path(cfg.data_path)
    folder = images_dir(data_path)
    if not folder.is_dir():
        raise UserError(f"no images folder: {folder} (expected <data_path>/images)")
    originals = Path(cfg.preprocess.originals_dir)
    if originals.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"preprocess.originals_dir ({originals}) must not be inside {folder}")
    refuse_unwritable(folder, originals)

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    pdf_paths = [p for p in files if p.suffix.lower() == PDF_EXT]
    ignored = [p for p in files if p not in images and p not in pdf_paths]

    outcomes: list[Outcome] = []
    pdfs: dict[Path, int] = {}
    for path in pdf_paths:
        pages = pdf_page_count(path)
        if isinstance(pages, str):
            outcomes.append(Outcome(path, UNREADABLE, message=pages))
        else:
            pdfs[path] = pages
        if label_path_for(path).exists() and not any(p.stem == path.stem for p in images):
            logger.warning(
                f"{label_path_for(path)} belongs to the PDF {path.name}; its page images get no labels"
            )
    targets, clashes = plan_targets(images, pdfs, {p.name.lower() for p in files})
    outcomes += clashes

    converter = Converter(data_path, originals, int(cfg.preprocess.jpg_quality), int(cfg.preprocess.pdf_dpi))
    outcomes += parallel_map(
        converter.convert_pair,
        [(p, targets[p][0]) for p in images if p in targets],
        int(cfg.preprocess.workers),
        "converting images",
        processes=True,  # decode + encode is CPU work, and this stage runs in its own process
    )
    outcomes += [converter.render_pdf(p, targets[p]) for p in pdfs if p in targets]

    summary = Summary(sorted(outcomes, key=lambda o: o.source), ignored)
    problems = summary.by_status(UNREADABLE) + summary.by_status(CLASH)
    (logger.warning if problems else logger.info)(f"preprocess {folder}: {summary.text()}")
    if summary.by_status(CONVERTED):
        logger.info(f"originals moved to {originals} (delete it yourself once you are happy with the result)")
    return summary


main = stage_main(run)

if __name__ == "__main__":
    main()
