"""U-MRG-format samples: the :class:`Sample` record and every reader (datasets folders, parquet, plain folders).

U-MRG is stored as parquet (or a ``datasets`` folder) with one row per sample:

- ``images``: list with one image (``{"bytes": PNG/JPEG, "path": ...}``);
- ``masks``: list with the target mask (0/255 image), possibly empty;
- ``prompt``: chat list, ``[{"role": "user", "content": "<implicit question>"}]``;
- ``reward_model``: ``{"ground_truth": '{"bbox_2d": [...], "point_2d": [[x, y], [x, y]]}'}``;
- ``data_source``: a string; ``extra_info``: ``{"id", "supercategory", "category", "reasoning", "metadata"}``
  (``metadata``: a JSON object as a string, e.g. the slice and window a volume slice was built with).

The ground truth is in the pixel space of the stored image. Every reader yields :class:`Sample`
objects; every problem with the data is an :class:`InputError` that names the file or sample.
Writing lives in :mod:`medreasoner.data.parquet`, building from labelled data in :mod:`medreasoner.data.builders`.
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
    # How the sample was made (volume slices: axis, slice index, window), so training data can be
    # checked against what inference shows; stored as JSON in extra_info.metadata.
    metadata: dict = field(default_factory=dict)

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


# --- checks shared by the readers ------------------------------------------------------------------
def _checked(stream: Iterable[Sample], where: str, limit: int | None) -> Iterator[Sample]:
    """Enforce unique, file-name-safe ids and the limit; an empty result is an error."""
    if limit == 0:
        return
    seen: set[str] = set()
    n = 0
    for s in stream:
        if (not s.id or not s.id.strip() or s.id != s.id.strip() or s.id in (".", "..") or "/" in s.id
                or "\\" in s.id or any(ord(c) < 32 for c in s.id)):  # "   .png", "a\n.png": no file to find
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
        metadata=_as_dict(extra.get("metadata")),
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
