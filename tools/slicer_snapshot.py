"""`make slicer-snapshot`: ask a question through the Slicer module's library, then picture Slicer's view.

Runs in the Slicer environment (.venv-slicer: Slicer's real MRML libraries, no application): loads the
volume into a scene, runs the module's local path against the real worker, and renders Slicer's own
axial slice view at the answer's key slice (volume, segment, box ROI, key points) to a PNG.

    .venv-slicer/bin/python tools/slicer_snapshot.py --volume V --question Q --python .venv/bin/python \
        --crm demo_out/models/crm --out docs/slicer_snapshot.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "MedReasonerSlicer"), str(ROOT / "tools")]


def snapshot(volume: str, question: str, settings, out_png: str, *, python: str, env: dict | None = None,
             size=(720, 600)) -> dict:
    """Run one question and render the key slice; returns the render info plus the answer."""
    import slicer
    import slicer_headless
    from MedReasonerLib.logic import MedReasonerLogic
    from MedReasonerLib.snapshot import render_slice_view

    slicer_headless.init()
    logic = MedReasonerLogic(worker_python=python, worker_env=env)
    try:
        node = slicer.util.loadVolume(str(volume), {"name": Path(volume).name.split(".")[0]})
        outcome = logic.start(node, question, settings).wait(1800, on_event=lambda e: print(f"  {e.kind}: {e.message}"))
    finally:
        logic.shutdown()
    [item] = outcome.segments
    if item.status != "ok":
        raise SystemExit(f"no target for {question!r}: {item.message}")
    roi = slicer.mrmlScene.GetNodeByID(item.roi_node_id)
    display = roi.GetDisplayNode()
    display.SetFillOpacity(0.0)  # the box as an outline: the segment stays visible inside it
    display.SetHandlesInteractive(False)
    axial_offset = float(item.key_slice_ras[2])  # axial view: the slice offset is S
    info = render_slice_view(node, out_png, ras_offset=axial_offset, size=size)
    info.update(volume_node_id=node.GetID(), offset=axial_offset, question=question, status=item.status, key_slice=item.record.get("key_slice"),
                warnings=item.warnings, roi_node_id=item.roi_node_id, points_node_id=item.points_node_id,
                segmentation_node_id=outcome.segmentation_node_id, segment_id=item.segment_id)
    return info


def main(argv=None) -> int:
    from MedReasonerLib.parameters import RunSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volume", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--python", required=True, help="the Python that runs the worker (with medreasoner installed)")
    p.add_argument("--crm", default="")
    p.add_argument("--asm", default="litemedsam")
    p.add_argument("--worker-args", default="--max-new-tokens 160", help="extra worker arguments")
    p.add_argument("--out", default="slicer_snapshot.png")
    args = p.parse_args(argv)
    settings = RunSettings(crm=args.crm, asm=args.asm, device="cpu", extra_worker_args=args.worker_args)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    info = snapshot(args.volume, args.question, settings, args.out, python=args.python, env=env)
    print(json.dumps({k: info[k] for k in ("path", "size", "window_class", "key_slice", "status", "warnings")},
                     indent=1))
    return 0 if os.path.exists(args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
