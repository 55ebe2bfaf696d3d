"""Read and write data in the U-MRG-14K layout, and build such data from labelled 2D images or volumes.

U-MRG is stored as parquet (or a ``datasets`` folder) with one row per sample:

- ``images``: list with one image (``{"bytes": PNG/JPEG, "path": ...}``);
- ``masks``: list with the target mask (0/255 image), possibly empty;
- ``prompt``: chat list, ``[{"role": "user", "content": "<implicit question>"}]``;
- ``reward_model``: ``{"ground_truth": '{"bbox_2d": [...], "point_2d": [[x, y], [x, y]]}'}``;
- ``data_source``: a string; ``extra_info``: ``{"id", "supercategory", "category"}``.

The ground truth is in the pixel space of the stored image. Every reader yields :class:`Sample`
objects; every problem with the data is an :class:`InputError` that names the file or sample.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.errors import InputError
from medreasoner.io.files import atomic_write_with, guard_outputs, png_bytes
from medreasoner.io.images import image_from_array, load_image
from medreasoner.science.keypoints import ground_truth_from_mask

QUERY_FILES = ("queries.jsonl", "queries.json")
HF_MARKERS = ("dataset_dict.json", "state.json")  # what ``save_to_disk`` writes (dict / single dataset)
_BATCH = 64
_IMAGE_PLACEHOLDER = re.compile(r"<image>")

# Column names we accept, preferred first (U-MRG's, then common alternatives).
_IMAGE_COLUMNS = ("images", "image")
_MASK_COLUMNS = ("masks", "mask")
_QUERY_COLUMNS = ("prompt", "query")
_GT_COLUMNS = ("reward_model", "reward_model.ground_truth", "ground_truth")


@dataclass(eq=False)
class Sample:
    """One grounding sample: an RGB image, the implicit question, and the target.

    ``ground_truth`` is ``{"bbox_2d": [x1, y1, x2, y2], "point_2d": [[x, y], [x, y]]}`` in the
    pixel space of ``image``. ``source`` is where the sample was read from (used to refuse writing
    over an input); it is not part of the U-MRG record.
    """

    id: str
    image: np.ndarray
    mask: np.ndarray | None
    query: str
    ground_truth: dict
    supercategory: str = ""
    category: str = ""
    data_source: str = "umrg"
    source: str = field(default="", repr=False)
    reasoning: str | None = None  # a reasoning trace for SFT, where the data has one

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


# --- public API ------------------------------------------------------------------------------------
def load_samples(path: str | Path, split: str = "test", limit: int | None = None) -> list[Sample]:
    """All samples of ``split`` (at most ``limit``) from a datasets folder, parquet, or plain folder."""
    return list(iter_samples(path, split=split, limit=limit))


def iter_samples(path: str | Path, split: str = "test", limit: int | None = None) -> Iterator[Sample]:
    """Like :func:`load_samples`, one sample at a time (images are decoded as they are reached).

    ``path`` may be:

    - a folder written by ``datasets``' ``save_to_disk`` (a DatasetDict: ``split`` picks the split;
      a single Dataset: ``split`` is ignored);
    - a ``.parquet`` file (``split`` is ignored), or a folder with ``{split}*.parquet``,
      ``data/{split}-*.parquet`` or ``{split}/*.parquet``;
    - a plain folder with ``images/``, optional ``masks/`` (same file stem as the image) and
      ``queries.jsonl`` / ``queries.json`` (``split`` is ignored), or that queries file itself.

    The format, split and columns are checked now; unreadable images raise when they are reached.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"data not found: {p}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"limit must be a whole number >= 0 or None, got {limit!r}")
    if p.is_file():
        if p.name in QUERY_FILES:
            stream = _plain_folder_samples(p.parent, p)
        elif p.suffix.lower() == ".parquet":
            stream = _parquet_samples([p], split)
        else:
            raise InputError(f"{p} is neither a .parquet file nor a queries file ({', '.join(QUERY_FILES)})")
    elif any((p / m).is_file() for m in HF_MARKERS):
        stream = _datasets_samples(p, split)
    elif files := _parquet_files(p, split):
        stream = _parquet_samples(files, split)
    elif query_file := next((p / q for q in QUERY_FILES if (p / q).is_file()), None):
        stream = _plain_folder_samples(p, query_file)
    else:
        found = _parquet_splits(p)
        if found:
            raise InputError(
                f"no parquet files for split {split!r} in {p}; splits found: {', '.join(found)} "
                "(or pass a single .parquet file to read it whatever its split)"
            )
        raise InputError(
            f"{p} holds no U-MRG data: expected a datasets folder (save_to_disk), parquet files, or "
            f"images/ with {' or '.join(QUERY_FILES)}"
        )
    return _checked(stream, f"split {split!r} of {p}", limit)


def write_parquet(samples: Iterable[Sample], path: str | Path, *, inputs: Sequence[str | Path] = ()) -> Path:
    """Write the samples to one parquet file in the U-MRG column layout; return its path.

    The file is written to a temporary name in the same folder and renamed, so a reader never
    sees half a file. It refuses to replace any file the samples were read from (or ``inputs``).
    The schema carries ``datasets`` metadata, so ``load_dataset("parquet", ...)`` decodes the
    ``images`` and ``masks`` columns as images.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path).expanduser()
    if out.is_dir():
        raise InputError(f"{out} is a folder; give the path of the .parquet file to write")
    samples = list(samples)
    if not samples:
        raise InputError("no samples to write")
    guard_outputs([out], [Path(p) for p in inputs] + [Path(s.source) for s in samples if s.source])
    resolved = out.resolve()
    for src in {s.source for s in samples if s.source}:
        sp = Path(src).resolve()
        if sp.is_dir() and sp in resolved.parents:
            raise InputError(f"refusing to write {out} inside the input dataset folder {src}")
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise InputError(f"duplicate sample id {s.id!r}: ids must be unique")
        seen.add(s.id)

    schema = _umrg_schema(pa)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, len(samples), _BATCH):
                rows = [_umrg_row(s) for s in samples[start:start + _BATCH]]
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))

    return atomic_write_with(out, write)


def samples_from_2d(images_dir: str | Path, masks_dir: str | Path, queries_file: str | Path, *,
                    data_source: str = "umrg") -> list[Sample]:
    """Samples from labelled 2D images; the ground truth is always derived from the masks.

    ``queries_file`` (.jsonl, or .json holding a list) has records ``{"image": "name.png",
    "query": "...", optional "mask", "id", "supercategory", "category"}``; names are relative to
    ``images_dir`` / ``masks_dir``, and without "mask" the mask is the file with the image's stem.
    Nothing is skipped: a record whose image or mask is missing, or whose mask is empty, is an error.
    """
    images, masks, qfile = Path(images_dir).expanduser(), Path(masks_dir).expanduser(), Path(queries_file).expanduser()
    for what, d in (("images", images), ("masks", masks)):
        if not d.is_dir():
            raise InputError(f"{what} folder not found: {d}")
    if not qfile.is_file():
        raise InputError(f"queries file not found: {qfile}")
    records = _read_records(qfile)
    stream = _records_to_samples(records, qfile, images, masks, require_mask=True, gt_from_mask=True,
                                 data_source=data_source)
    return list(_checked(stream, str(qfile), None))


def samples_from_volumes(pairs: Sequence[tuple[str | Path, str | Path]], label_queries: Mapping[int, Mapping[str, str]],
                         axis: int = 2, min_area: int = 20, every: int = 1, *, data_source: str = "umrg",
                         progress: bool = True) -> list[Sample]:
    """2D samples from NIfTI (volume, label map) pairs: one per slice and label with enough pixels.

    Volumes are brought to the closest RAS orientation, so ``axis`` 0/1/2 is sagittal/coronal/axial,
    and each slice is rotated so that superior / anterior is up. Intensities are scaled to uint8
    per volume (0.5-99.5 percentiles of the non-zero voxels). For each label in ``label_queries``
    (``{label: {"query", "supercategory", "category"}}``) the slices with at least ``min_area``
    pixels of it are kept, then every ``every``-th of those. Ids are
    ``{volume_stem}_{label}_{axis}{index:04d}``, the index counted in the RAS-oriented volume.
    """
    import nibabel as nib
    from tqdm import tqdm

    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {axis!r}")
    if not isinstance(min_area, int) or min_area < 1:
        raise InputError(f"min_area must be a whole number >= 1, got {min_area!r}")
    if not isinstance(every, int) or every < 1:
        raise InputError(f"every must be a whole number >= 1, got {every!r}")
    labels = _check_label_queries(label_queries)
    pairs = [(Path(v).expanduser(), Path(lab).expanduser()) for v, lab in pairs]
    if not pairs:
        raise InputError("no (volume, label map) pairs given")
    for v, lab in pairs:
        for p in (v, lab):
            if not p.is_file():
                raise InputError(f"NIfTI file not found: {p}")

    samples: list[Sample] = []
    bar = tqdm(total=0, desc="slicing volumes", unit="slice", disable=not progress)
    try:
        for vpath, lpath in pairs:
            volume, labelmap = _load_pair(nib, vpath, lpath)
            scaled = _volume_to_uint8(volume)
            stem = _nifti_stem(vpath)
            other = tuple(a for a in range(3) if a != axis)
            for label, info in labels.items():
                hit = labelmap == label
                kept = np.flatnonzero(hit.sum(axis=other) >= min_area)[::every]
                bar.total += len(kept)
                bar.refresh()
                for k in kept:
                    mask = np.ascontiguousarray(np.rot90(np.take(hit, k, axis=axis)))
                    grey = np.rot90(np.take(scaled, k, axis=axis))
                    samples.append(Sample(
                        id=f"{stem}_{label}_{axis}{int(k):04d}",
                        image=np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)),
                        mask=mask,
                        query=info["query"],
                        ground_truth=ground_truth_from_mask(mask),
                        supercategory=info.get("supercategory", ""),
                        category=info.get("category", ""),
                        data_source=data_source,
                        source=str(vpath),
                    ))
                    bar.update(1)
    finally:
        bar.close()
    if not samples:
        raise InputError(
            f"no slice along axis {axis} has >= {min_area} pixels of any label in {sorted(labels)}; "
            "check the label numbers and min_area"
        )
    return samples


# --- checks shared by the readers ------------------------------------------------------------------
def _checked(stream: Iterable[Sample], where: str, limit: int | None) -> Iterator[Sample]:
    """Enforce unique, file-name-safe ids and the limit; an empty result is an error."""
    if limit == 0:
        return
    seen: set[str] = set()
    n = 0
    for s in stream:
        if not s.id or s.id in (".", "..") or "/" in s.id or "\\" in s.id:
            raise InputError(f"sample id {s.id!r} cannot be used as a file name (results are saved per id)")
        if s.id in seen:
            raise InputError(f"duplicate sample id {s.id!r} in {where}: ids must be unique")
        seen.add(s.id)
        yield s
        n += 1
        if limit is not None and n >= limit:
            return
    if n == 0:
        raise InputError(f"no samples in {where}")


def _num(v: Any, sid: str) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(f"sample {sid}: ground truth holds {v!r} where a finite number is needed")
    return v


def _parse_ground_truth(value: Any, sid: str) -> dict | None:
    """The ground truth as a checked dict, or None when there is none."""
    if isinstance(value, Mapping) and "ground_truth" in value and "bbox_2d" not in value:
        value = value["ground_truth"]  # the reward_model struct
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InputError(f"sample {sid}: ground truth is not valid JSON ({exc})") from exc
    if value is None or (isinstance(value, Mapping) and not value):
        return None
    if not isinstance(value, Mapping):
        raise InputError(f"sample {sid}: ground truth must be an object, got {type(value).__name__}")
    box, points = value.get("bbox_2d"), value.get("point_2d")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise InputError(f"sample {sid}: ground truth needs bbox_2d = [x1, y1, x2, y2], got {box!r}")
    if (not isinstance(points, (list, tuple)) or not points
            or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points)):
        raise InputError(f"sample {sid}: ground truth needs point_2d = [[x, y], [x, y]], got {points!r}")
    gt = dict(value)
    gt["bbox_2d"] = [float(_num(v, sid)) for v in box]
    gt["point_2d"] = [[_num(v, sid) for v in p] for p in points]
    return gt


def _resolve_ground_truth(gt: dict | None, mask: np.ndarray | None, sid: str) -> dict:
    if gt is not None:
        return gt
    if mask is None:
        raise InputError(f"sample {sid} has neither a ground truth nor a mask to derive one from")
    try:
        return ground_truth_from_mask(mask)
    except InputError as exc:
        raise InputError(f"sample {sid}: {exc}") from exc


def _mask_array(pixels: np.ndarray, sid: str) -> np.ndarray:
    a = np.asarray(pixels)
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1) if a.shape[-1] >= 3 else a[..., 0]
    if a.ndim != 2:
        raise InputError(f"sample {sid}: the mask must be a 2D image, got shape {a.shape}")
    return a > 0


def _check_sizes(image: np.ndarray, mask: np.ndarray | None, sid: str) -> None:
    if mask is not None and mask.shape != image.shape[:2]:
        raise InputError(f"sample {sid}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                         f"{image.shape[1]}x{image.shape[0]} (width x height)")


# --- images stored in rows ------------------------------------------------------------------------
def _decode_bytes(data: bytes, sid: str, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _pil_array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"sample {sid}: cannot decode the {what} bytes as an image ({exc})") from exc


def _pil_array(im) -> np.ndarray:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    return np.asarray(im)


def _pixels(value: Any, sid: str, what: str, base: Path) -> np.ndarray:
    """Raw pixels of an image cell: HF Image struct, bytes, a path, a PIL image, or an array."""
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _decode_bytes(bytes(data), sid, what)
        if path:
            return _pixels(str(path), sid, what, base)
        raise InputError(f"sample {sid}: the {what} has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value), sid, what)
    if isinstance(value, str):
        p = Path(value)
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise InputError(f"sample {sid}: the {what} file {p} does not exist")
        return load_image(p).pixels
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "mode") and hasattr(value, "getdata"):  # a PIL image (decoded by datasets)
        return _pil_array(value)
    raise InputError(f"sample {sid}: cannot read the {what} from a value of type {type(value).__name__}")


def _single(value: Any, sid: str, what: str) -> Any:
    """U-MRG stores lists of one image; unwrap them (an empty list means none)."""
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise InputError(f"sample {sid} has {len(value)} {what}s; one per sample is supported")
        return value[0] if value else None
    return value


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "\n".join(t for t in (_text(c) for c in content) if t)
    return ""


def _query_from_prompt(prompt: Any, sid: str) -> str:
    """The user's text from a chat prompt (or a plain string), without ``<image>`` placeholders."""
    if isinstance(prompt, str) and prompt.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            prompt = json.loads(prompt)
    if isinstance(prompt, Mapping):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)):
        texts = [_text(m.get("content")) for m in prompt if isinstance(m, Mapping) and m.get("role", "user") == "user"]
        texts = [t for t in texts if t.strip()]
        text = texts[-1] if texts else ""
    else:
        text = prompt if isinstance(prompt, str) else ""
    text = _IMAGE_PLACEHOLDER.sub("", text).strip()
    if not text:
        raise InputError(f"sample {sid} has no question: the prompt holds no user text")
    return text


# --- parquet / datasets rows -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Columns:
    image: str
    query: str
    mask: str | None
    gt: str | None

    @staticmethod
    def find(names: Sequence[str], where: Any) -> _Columns:
        def pick(options):
            return next((c for c in options if c in names), None)

        image, query, mask, gt = pick(_IMAGE_COLUMNS), pick(_QUERY_COLUMNS), pick(_MASK_COLUMNS), pick(_GT_COLUMNS)
        missing = [name for name, col in (("images", image), ("prompt", query)) if col is None]
        if gt is None and mask is None:
            missing.append("reward_model (or masks)")
        if missing:
            raise InputError(f"{where} lacks the U-MRG column(s) {', '.join(missing)}; "
                             f"its columns are: {', '.join(names) or 'none'}")
        return _Columns(image, query, mask, gt)

    def wanted(self, names: Sequence[str]) -> list[str]:
        extra = [c for c in ("id", "data_source", "extra_info") if c in names]
        return [c for c in (self.image, self.query, self.mask, self.gt, *extra) if c is not None]


def _as_dict(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    return dict(value) if isinstance(value, Mapping) else {}


def _sample_from_row(row: Mapping[str, Any], cols: _Columns, n: int, split: str, source: Path,
                     base: Path) -> Sample:
    extra = _as_dict(row.get("extra_info"))
    sid = row.get("id")
    if sid is None or sid == "":
        sid = extra.get("id")
    sid = f"{split}-{n:06d}" if sid is None or sid == "" else str(sid)
    image_cell = _single(row.get(cols.image), sid, "image")
    if image_cell is None:
        raise InputError(f"sample {sid} has no image")
    image = image_from_array(_pixels(image_cell, sid, "image", base), path=f"sample {sid}").rgb
    mask_cell = _single(row.get(cols.mask), sid, "mask") if cols.mask else None
    mask = None if mask_cell is None else _mask_array(_pixels(mask_cell, sid, "mask", base), sid)
    _check_sizes(image, mask, sid)
    gt = _parse_ground_truth(row.get(cols.gt), sid) if cols.gt else None
    return Sample(
        id=sid,
        image=image,
        mask=mask,
        query=_query_from_prompt(row.get(cols.query), sid),
        ground_truth=_resolve_ground_truth(gt, mask, sid),
        supercategory=str(extra.get("supercategory") or ""),
        category=str(extra.get("category") or ""),
        data_source=str(row.get("data_source") or "umrg"),
        source=str(source),
        reasoning=extra.get("reasoning") or row.get("reasoning") or None,
    )


def _parquet_files(folder: Path, split: str) -> list[Path]:
    patterns = (f"{split}*.parquet", f"data/{split}-*.parquet", f"{split}/*.parquet")
    return sorted({f for pat in patterns for f in folder.glob(pat) if f.is_file()})


def _parquet_splits(folder: Path) -> list[str]:
    """Split names guessed from the parquet files in a folder, for error messages."""
    names = set()
    for f in [*folder.glob("*.parquet"), *folder.glob("data/*.parquet")]:
        names.add(re.split(r"[-_.]", f.stem)[0] or f.stem)
    names.update(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.parquet")) and d.name != "data")
    return sorted(names)


def _parquet_samples(files: list[Path], split: str) -> Iterator[Sample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = []
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {f} as parquet: {exc}") from exc
        cols = _Columns.find(names, f)
        columns.append((f, cols, cols.wanted(names)))

    def generate() -> Iterator[Sample]:
        n = 0
        for f, cols, wanted in columns:
            try:
                batches = pq.ParquetFile(f).iter_batches(batch_size=_BATCH, columns=wanted)
                for batch in batches:
                    for row in batch.to_pylist():
                        yield _sample_from_row(row, cols, n, split, f, f.parent)
                        n += 1
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"cannot read {f} as parquet: {exc}") from exc

    return generate()


def _datasets_samples(folder: Path, split: str) -> Iterator[Sample]:
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            f"{folder} is a Hugging Face `datasets` folder, and reading it needs the `datasets` package: "
            "pip install datasets (or medreasoner[train]); or export the data to parquet"
        ) from exc
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
        raise InputError(f"cannot read the datasets folder {folder}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"split {split!r} not in {folder}; its splits are: {', '.join(ds) or 'none'}")
        ds = ds[split]
    cols = _Columns.find(ds.column_names, folder)
    ds = ds.select_columns(cols.wanted(ds.column_names)).with_format("arrow")  # raw bytes, no decoding

    def generate() -> Iterator[Sample]:
        n = 0
        for table in ds.iter(batch_size=_BATCH):
            for row in table.to_pylist():
                yield _sample_from_row(row, cols, n, split, folder, folder)
                n += 1

    return generate()


# --- plain folders ---------------------------------------------------------------------------------
def _read_records(qfile: Path) -> list[dict]:
    """Records of a queries file (.jsonl: one object a line; .json: a list of objects)."""
    try:
        text = qfile.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {qfile}: {exc}") from exc
    if qfile.suffix.lower() == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{qfile} line {i} is not valid JSON ({exc})") from exc
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{qfile} is not valid JSON ({exc})") from exc
        if isinstance(records, Mapping):
            records = records.get("samples", records.get("queries"))
        if not isinstance(records, list):
            raise InputError(f"{qfile} must hold a list of records like {{\"image\": ..., \"query\": ...}}")
    for i, r in enumerate(records, 1):
        if not isinstance(r, Mapping):
            raise InputError(f"{qfile} record {i} is not an object")
        for key in ("image", "query"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise InputError(f"{qfile} record {i} needs a non-empty {key!r} string")
    if not records:
        raise InputError(f"{qfile} has no records")
    return records


class _MaskIndex:
    """Finds a mask by the image's stem (``name.*`` or ``name_mask.*``), preferring PNG."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[Path, dict[str, list[Path]]] = {}

    def find(self, image_name: str) -> Path | None:
        rel = Path(image_name)
        folder = self.root / rel.parent
        if folder not in self._dirs:
            index: dict[str, list[Path]] = {}
            if folder.is_dir():
                for f in sorted(folder.iterdir()):
                    if f.is_file() and not f.name.startswith("."):
                        index.setdefault(f.stem, []).append(f)
            self._dirs[folder] = index
        index = self._dirs[folder]
        for stem in (rel.stem, f"{rel.stem}_mask"):
            found = index.get(stem, [])
            if found:
                return next((f for f in found if f.name == rel.name),
                            next((f for f in found if f.suffix.lower() == ".png"), found[0]))
        return None


def _records_to_samples(records: list[dict], qfile: Path, images: Path, masks: Path | None, *,
                        require_mask: bool, gt_from_mask: bool, data_source: str) -> Iterator[Sample]:
    index = _MaskIndex(masks) if masks is not None else None
    for i, rec in enumerate(records, 1):
        where = f"{qfile} record {i}"
        image_path = images / rec["image"]
        if not image_path.is_file():
            raise InputError(f"{where}: image {rec['image']!r} not found in {images}")
        sid = str(rec.get("id") or Path(rec["image"]).stem)
        mask_path = None
        if rec.get("mask"):
            mask_path = (masks or images.parent) / rec["mask"]
            if not mask_path.is_file():
                raise InputError(f"{where}: mask {rec['mask']!r} not found in {mask_path.parent}")
        elif index is not None:
            mask_path = index.find(rec["image"])
        if mask_path is None and require_mask:
            raise InputError(f"{where}: no mask for image {rec['image']!r} in {masks}")
        image = load_image(image_path).rgb
        mask = None if mask_path is None else _mask_array(load_image(mask_path).pixels, sid)
        _check_sizes(image, mask, sid)
        gt = None
        if not gt_from_mask:
            inline = {k: rec[k] for k in ("bbox_2d", "point_2d") if k in rec} or None
            gt = _parse_ground_truth(rec.get("ground_truth", inline), sid)
        yield Sample(
            id=sid,
            image=image,
            mask=mask,
            query=rec["query"].strip(),
            ground_truth=_resolve_ground_truth(gt, mask, sid),
            supercategory=str(rec.get("supercategory") or ""),
            category=str(rec.get("category") or ""),
            data_source=str(rec.get("data_source") or data_source),
            source=str(image_path),
            reasoning=rec.get("reasoning") or None,
        )


def _plain_folder_samples(root: Path, qfile: Path) -> Iterator[Sample]:
    images = root / "images"
    if not images.is_dir():
        raise InputError(f"{root} has {qfile.name} but no images/ folder")
    masks = root / "masks"
    records = _read_records(qfile)
    return _records_to_samples(records, qfile, images, masks if masks.is_dir() else None,
                               require_mask=False, gt_from_mask=False, data_source="umrg")


# --- writing ---------------------------------------------------------------------------------------
def _umrg_schema(pa):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    string = {"dtype": "string", "_type": "Value"}
    hf_features = {  # what `datasets` reads back: images and masks as Image features
        "images": [{"_type": "Image"}],
        "masks": [{"_type": "Image"}],
        "prompt": [{"role": string, "content": string}],
        "reward_model": {"ground_truth": string},
        "data_source": string,
        "extra_info": {"id": string, "supercategory": string, "category": string, "reasoning": string},
    }
    schema = pa.schema([
        ("images", pa.list_(image)),
        ("masks", pa.list_(image)),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("reward_model", pa.struct([("ground_truth", pa.string())])),
        ("data_source", pa.string()),
        ("extra_info", pa.struct([("id", pa.string()), ("supercategory", pa.string()), ("category", pa.string()),
                                  ("reasoning", pa.string())])),
    ])
    return schema.with_metadata({b"huggingface": json.dumps({"info": {"features": hf_features}}).encode()})


def _umrg_row(s: Sample) -> dict:
    image = np.asarray(s.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"sample {s.id}: image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    mask = None if s.mask is None else np.asarray(s.mask).astype(bool)
    if mask is not None and mask.ndim != 2:
        raise InputError(f"sample {s.id}: mask must be (H, W), got shape {mask.shape}")
    _check_sizes(image, mask, s.id)
    gt = _resolve_ground_truth(_parse_ground_truth(s.ground_truth, s.id), mask, s.id)
    return {
        "images": [{"bytes": png_bytes(image), "path": f"{s.id}.png"}],
        "masks": [] if mask is None else [{"bytes": png_bytes(mask.astype(np.uint8) * 255),
                                           "path": f"{s.id}_mask.png"}],
        "prompt": [{"role": "user", "content": s.query}],
        "reward_model": {"ground_truth": json.dumps(gt)},
        "data_source": s.data_source,
        "extra_info": {"id": s.id, "supercategory": s.supercategory, "category": s.category,
                       "reasoning": s.reasoning},
    }


# --- volumes ---------------------------------------------------------------------------------------
def _check_label_queries(label_queries: Mapping[int, Mapping[str, str]]) -> dict[int, Mapping[str, str]]:
    if not isinstance(label_queries, Mapping) or not label_queries:
        raise InputError("label_queries must map label numbers to {'query': ..., 'supercategory': ..., 'category': ...}")
    out = {}
    for label, info in label_queries.items():
        try:
            number = int(label)
        except (TypeError, ValueError) as exc:
            raise InputError(f"label {label!r} is not a whole number") from exc
        if number == 0:
            raise InputError("label 0 is background; give the numbers of the structures to slice")
        if not isinstance(info, Mapping) or not isinstance(info.get("query"), str) or not info["query"].strip():
            raise InputError(f"label {label!r} needs a non-empty 'query'")
        out[number] = info
    return dict(sorted(out.items()))


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _load_pair(nib, vpath: Path, lpath: Path) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32, integer label map), both RAS-oriented and checked to match."""
    imgs = []
    for p in (vpath, lpath):
        try:
            img = nib.squeeze_image(nib.load(str(p)))
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for bad files
            raise InputError(f"cannot read {p} as NIfTI: {exc}") from exc
        if len(img.shape) != 3:
            raise InputError(f"{p} is not a 3D volume (shape {img.shape})")
        imgs.append(img)
    vol, lab = imgs
    if vol.shape != lab.shape:
        raise InputError(f"{lpath} has shape {lab.shape} but {vpath} has {vol.shape}")
    if not np.allclose(vol.affine, lab.affine, atol=1e-3):
        raise InputError(f"{lpath} and {vpath} have different affines: they are not on the same grid")
    vol, lab = nib.as_closest_canonical(vol), nib.as_closest_canonical(lab)
    labels = np.asarray(lab.dataobj)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(np.nan_to_num(labels.astype(np.float64)))
    return np.asarray(vol.dataobj, dtype=np.float32), labels.astype(np.int32)


def _volume_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Scale to 0..255 by the 0.5-99.5 percentiles of the finite non-zero voxels (zeros are padding)."""
    finite = np.isfinite(volume)
    values = volume[finite & (volume != 0)]
    if values.size == 0:
        return np.zeros(volume.shape, np.uint8)
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    v = np.where(finite, volume, lo)
    if hi <= lo:  # a single non-zero value: show it white
        return np.where(v != 0, 255, 0).astype(np.uint8)
    return np.rint((np.clip(v, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
