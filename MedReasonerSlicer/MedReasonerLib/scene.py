"""Applying results to the scene as one unit: segments, ROI and key points, or nothing at all.

Every node and segment a run adds is recorded on a ``SceneEdit``; if anything fails half way, the
edit is rolled back and the scene is as it was. A result that found no target adds nothing; its
message is reported instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from MedReasonerLib import markups, terminology
from MedReasonerLib.errors import MedReasonerSlicerError

# Segment tags (strings, saved with the segmentation) that keep each segment's question and answer.
TAG_QUESTION = "MedReasoner.Question"
TAG_REASONING = "MedReasoner.Reasoning"
TAG_RECORD = "MedReasoner.Record"
TAG_KEY_SLICE = "MedReasoner.KeySliceRAS"
TAG_NODES = "MedReasoner.MarkupsNodeIDs"
MARKUP_NAME_CHARS = 28  # markup names are drawn in the views: keep them short
TERMINOLOGY_TAG = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName()


@dataclass
class QuestionResult:
    """What a backend returned for one question: the result record and the label file (.seg.nrrd)."""

    question: str
    record: dict[str, Any]
    label_path: str | None

    @property
    def status(self) -> str:
        return str(self.record.get("status", ""))


@dataclass
class AppliedSegment:
    """One question's answer as it now stands in the scene."""

    question: str
    status: str
    message: str
    reasoning: str
    warnings: list[str]
    segment_id: str | None = None
    segment_name: str = ""
    roi_node_id: str | None = None
    points_node_id: str | None = None
    key_slice_ras: list[float] | None = None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    segmentation_node_id: str | None
    segments: list[AppliedSegment]

    @property
    def warnings(self) -> list[str]:
        seen: list[str] = []
        for s in self.segments:
            seen += [w for w in s.warnings if w not in seen]
        return seen

    @property
    def no_target(self) -> list[AppliedSegment]:
        return [s for s in self.segments if s.status == "no_target"]


class SceneEdit:
    """Nodes and segments added by one run; ``rollback()`` removes them all."""

    def __init__(self, scene):
        self.scene = scene
        self.nodes: list[Any] = []
        self.segments: list[tuple] = []  # (segmentation node, segment id)

    def add_node(self, node):
        self.nodes.append(node)
        return node

    def rollback(self) -> None:
        for seg_node, seg_id in reversed(self.segments):
            if self.scene.IsNodePresent(seg_node):
                seg_node.GetSegmentation().RemoveSegment(seg_id)
        for node in reversed(self.nodes):
            if self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.nodes, self.segments = [], []


def output_segmentation(scene, volume_node, segmentation_node, edit: SceneEdit):
    """The chosen segmentation node, or a new one on the volume's grid (and under its transform)."""
    if segmentation_node is not None:
        return segmentation_node
    node = edit.add_node(scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{volume_node.GetName()} MedReasoner")))
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return node


def read_label_segment(scene, path: str):
    """The first segment of a .seg.nrrd (read by Slicer's own segmentation reader), as a new vtkSegment."""
    import slicer

    temp = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedReasoner temporary")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(temp) or temp.GetSegmentation().GetNumberOfSegments() < 1:
            raise MedReasonerSlicerError(f"could not read the result segmentation {path}", "worker")
        source = temp.GetSegmentation().GetNthSegment(0)
        segment = slicer.vtkSegment()
        segment.DeepCopy(source)
        return segment
    finally:
        scene.RemoveNode(temp)


def apply_results(scene, volume_node, results: list[QuestionResult], segmentation_node=None) -> Outcome:
    """Add one segment (+ ROI + key points) per result that found a target; all or nothing."""
    edit = SceneEdit(scene)
    try:
        return _apply(scene, volume_node, results, segmentation_node, edit)
    except BaseException:
        edit.rollback()
        raise


def _apply(scene, volume_node, results, segmentation_node, edit: SceneEdit) -> Outcome:
    found = [r for r in results if r.status == "ok"]
    seg_node = output_segmentation(scene, volume_node, segmentation_node, edit) if found else segmentation_node
    segmentation = seg_node.GetSegmentation() if seg_node is not None else None
    taken_names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] \
        if segmentation is not None else []
    taken_colours = [tuple(segmentation.GetNthSegment(i).GetColor())
                     for i in range(segmentation.GetNumberOfSegments())] if segmentation is not None else []
    applied: list[AppliedSegment] = []
    for _index, result in enumerate(results):
        rec = result.record
        item = AppliedSegment(result.question, result.status, str(rec.get("message") or ""),
                              str(rec.get("reasoning") or ""), list(rec.get("warnings") or []), record=rec)
        centre = markups.key_slice_centre_ras(rec)
        item.key_slice_ras = [float(v) for v in centre] if centre is not None else None
        applied.append(item)
        if result.status != "ok":
            continue
        if not result.label_path:
            raise MedReasonerSlicerError(f"the answer to {result.question!r} came without a label file", "worker")
        style = terminology.style_for(result.question, len(taken_colours), taken_names, taken_colours)
        segment = read_label_segment(scene, result.label_path)
        segment.SetName(style.name)
        segment.SetColor(*style.colour)
        if style.terminology:
            segment.SetTag(TERMINOLOGY_TAG, style.terminology)
        segment.SetTag(TAG_QUESTION, result.question)
        segment.SetTag(TAG_REASONING, item.reasoning)
        segment.SetTag(TAG_RECORD, json.dumps(rec, default=str))
        if item.key_slice_ras is not None:
            segment.SetTag(TAG_KEY_SLICE, json.dumps(item.key_slice_ras))
        seg_id = segmentation.GenerateUniqueSegmentID("MedReasoner")
        if not segmentation.AddSegment(segment, seg_id):
            raise MedReasonerSlicerError(f"could not add the segment for {result.question!r}", "worker")
        edit.segments.append((seg_node, seg_id))
        item.segment_id, item.segment_name = seg_id, style.name
        taken_names.append(style.name)
        taken_colours.append(style.colour)
        nodes = []
        short = style.name if len(style.name) <= MARKUP_NAME_CHARS else style.name[: MARKUP_NAME_CHARS - 1] + "…"
        if rec.get("box_corners_lps"):
            roi = edit.add_node(markups.add_box(scene, volume_node, rec["box_corners_lps"], f"{short} box",
                                                style.colour))
            roi.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            item.roi_node_id = roi.GetID()
            nodes.append(roi.GetID())
        if rec.get("points_lps"):
            fid = edit.add_node(markups.add_points(scene, rec["points_lps"], f"{short} points", style.colour))
            fid.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            item.points_node_id = fid.GetID()
            nodes.append(fid.GetID())
        segment.SetTag(TAG_NODES, json.dumps(nodes))
    return Outcome(seg_node.GetID() if seg_node is not None else None, applied)


def remove_applied(scene, segmentation_node, item: AppliedSegment) -> None:
    """Undo one answer: its segment, box and key points."""
    if segmentation_node is not None and item.segment_id:
        segmentation_node.GetSegmentation().RemoveSegment(item.segment_id)
    for node_id in (item.roi_node_id, item.points_node_id):
        node = scene.GetNodeByID(node_id) if node_id else None
        if node is not None:
            scene.RemoveNode(node)


def applied_segments(scene, segmentation_node) -> list[AppliedSegment]:
    """The answers kept on a segmentation's segments (e.g. from a saved scene), rebuilt from their tags."""
    out: list[AppliedSegment] = []
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(index)
        info = segment_reasoning(segmentation_node, seg_id)
        if "question" not in info:
            continue  # not one of ours
        record = info.get("record") if isinstance(info.get("record"), dict) else {}
        item = AppliedSegment(info["question"], str(record.get("status") or "ok"), str(record.get("message") or ""),
                              str(info.get("reasoning") or ""), [str(w) for w in record.get("warnings") or []],
                              seg_id, segmentation.GetSegment(seg_id).GetName(), record=record,
                              key_slice_ras=info.get("key_slice_ras"))
        try:
            node_ids = json.loads(get_tag(segmentation.GetSegment(seg_id), TAG_NODES) or "[]")
        except ValueError:
            node_ids = []
        for node_id in node_ids:
            node = scene.GetNodeByID(str(node_id))
            if node is not None and node.IsA("vtkMRMLMarkupsROINode"):
                item.roi_node_id = node.GetID()
            elif node is not None and node.IsA("vtkMRMLMarkupsFiducialNode"):
                item.points_node_id = node.GetID()
        out.append(item)
    return out


def segment_reasoning(segmentation_node, segment_id: str) -> dict[str, Any]:
    """The question, reasoning, key slice and record kept on a segment (empty for other segments)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return {}
    out: dict[str, Any] = {}
    for key, tag in (("question", TAG_QUESTION), ("reasoning", TAG_REASONING), ("record", TAG_RECORD),
                     ("key_slice_ras", TAG_KEY_SLICE)):
        text = get_tag(segment, tag)
        if text is not None:
            out[key] = json.loads(text) if key in ("record", "key_slice_ras") else text
    return out


def get_tag(segment, tag: str) -> str | None:
    """vtkSegment::GetTag, whose value is an out-argument in VTK's Python wrapping."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None
