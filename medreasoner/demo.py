"""Offline demo: a real CT slice (shipped in pydicom), the tiny CRM and real LiteMedSAM weights.

Run with ``make demo`` or ``python -m medreasoner.demo --out demo_out``. The tiny CRM is built
once into ``OUT/models`` by ``medreasoner make-tiny``; its answers are meaningless by design and the
outputs say so. For real results, pass a real CRM (see README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medreasoner.cli import main as cli_main
from medreasoner.constants import CRM_SIDECAR

QUERY = "Which structure would explain this patient's shortness of breath?"


def write_mni(path: Path) -> int:
    """The MNI152 2009 T1 template ships inside nilearn: a real 3D MRI that needs no download."""
    import nibabel as nib
    from nilearn import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        nib.save(datasets.load_mni152_template(resolution=2), str(path))
    print(f"MNI152 T1 (2 mm) volume: {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--write-mni", metavar="PATH", default=None,
                    help="only write nilearn's MNI152 T1 template (2 mm, a real MRI volume) to PATH and exit")
    args = ap.parse_args(argv)
    if args.write_mni:
        return write_mni(Path(args.write_mni))
    from pydicom.data import get_testdata_file

    out = Path(args.out)
    crm_dir = out / "models" / "crm"
    if not (crm_dir / CRM_SIDECAR).is_file():
        rc = cli_main(["make-tiny", str(out / "models"), "--no-sam2"])
        if rc:
            return rc
    image = get_testdata_file("CT_small.dcm")
    rc = cli_main(["ground", "--image", image, "--query", QUERY, "--crm", str(crm_dir), "--asm", "litemedsam",
                   "--max-new-tokens", "160", "--out", str(out / "ground2d")])
    print(f"\nDemo outputs (tiny test CRM + real LiteMedSAM on pydicom's CT_small.dcm): {out / 'ground2d'}",
          file=sys.stderr)
    for f in sorted(p for p in (out / "ground2d").rglob("*") if p.is_file()):
        print(f"  {f}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
