"""Write U-MRG-format parquet: the arrow schema (with ``datasets`` features) and one row per sample."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medreasoner.data.samples import _BATCH, Sample, _check_sizes, _parse_ground_truth, _resolve_ground_truth
from medreasoner.errors import InputError
from medreasoner.io.files import atomic_write_with, guard_outputs, png_bytes


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

    def write(f) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for start in range(0, len(samples), _BATCH):
                rows = [_umrg_row(s) for s in samples[start:start + _BATCH]]
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))

    return atomic_write_with(out, write)


# --- U-MRG arrow schema and rows ------------------------------------------------------------------
def _umrg_schema(pa):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    string = {"dtype": "string", "_type": "Value"}
    hf_features = {  # what `datasets` reads back: images and masks as Image features
        "images": [{"_type": "Image"}],
        "masks": [{"_type": "Image"}],
        "prompt": [{"role": string, "content": string}],
        "reward_model": {"ground_truth": string},
        "data_source": string,
        "extra_info": {"id": string, "supercategory": string, "category": string, "reasoning": string,
                       "metadata": string},
    }
    schema = pa.schema([
        ("images", pa.list_(image)),
        ("masks", pa.list_(image)),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("reward_model", pa.struct([("ground_truth", pa.string())])),
        ("data_source", pa.string()),
        # metadata is a JSON string, not a struct: its keys vary by builder and readers that do not
        # know it (older medreasoner, plain `datasets`) just see one more string field.
        ("extra_info", pa.struct([("id", pa.string()), ("supercategory", pa.string()), ("category", pa.string()),
                                  ("reasoning", pa.string()), ("metadata", pa.string())])),
    ])
    return schema.with_metadata({b"huggingface": json.dumps({"info": {"features": hf_features}}).encode(),
                                 WRITER_KEY: b"build-dataset"})


# The parquet's schema metadata says this tool wrote it: only such a file is replaced without --overwrite.
WRITER_KEY = b"medreasoner"


def written_by_us(path: str | Path) -> bool:
    """True when ``path`` is a parquet file this tool wrote (its schema metadata says so)."""
    try:
        import pyarrow.parquet as pq

        return WRITER_KEY in (pq.read_schema(str(path)).metadata or {})
    except Exception:  # noqa: BLE001 - not parquet, unreadable, damaged: not ours
        return False


def check_replaceable_file(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to replace a file this tool did not write (unless ``overwrite``)."""
    p = Path(path)
    if overwrite or not (p.exists() or p.is_symlink()):
        return
    if p.is_symlink() or not p.is_file() or not written_by_us(p):
        raise InputError(f"refusing to replace {p}: this tool did not write it; choose another --out file, "
                         "or pass --overwrite")


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
                       "reasoning": s.reasoning, "metadata": _metadata_json(s)},
    }


def _metadata_json(s: Sample) -> str | None:
    if not s.metadata:
        return None
    try:
        return json.dumps(s.metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"sample {s.id}: metadata must be JSON-serialisable with finite numbers ({exc})") from exc
