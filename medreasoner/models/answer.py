"""Turn a CRM completion into a typed answer: think text, box, two key points and a status.

Tolerant of what real models emit (single-quoted or Python-literal JSON, code fences, text around
the tags, a missing closing tag, ``bbox_2d``/``point_2d`` keys, a list of objects, numbers as
strings); strict about what it returns. Safe repairs are applied and listed in ``repairs``.
``parse_completion`` never raises on model output.

``parse_answer_reference`` is the other reading: the public reference evaluation's strict rules with
no repairs (``evaluate --protocol reference``), so its table can be reproduced.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from medreasoner.imaging import geometry

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_ANSWER_RE = re.compile(r"<answer>(.*)$", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",\s*([}\]])")

BOX_KEYS = ("bbox", "bbox_2d", "box", "box_2d", "bounding_box")
POINT1_KEYS = ("points_1", "point_1", "point1", "points1")
POINT2_KEYS = ("points_2", "point_2", "point2", "points2")
POINT_LIST_KEYS = ("point_2d", "points_2d", "points", "key_points", "keypoints")


class AnswerStatus(str, Enum):
    OK = "ok"
    NO_ANSWER = "no_answer"
    BAD_JSON = "bad_json"
    MISSING_KEYS = "missing_keys"
    INVALID_VALUES = "invalid_values"


@dataclass
class ParsedAnswer:
    """What the CRM answered, in the pixel space it was parsed in."""

    status: AnswerStatus
    think: str | None = None
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] | None = None
    repairs: list[str] = field(default_factory=list)
    message: str = ""
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.status is AnswerStatus.OK

    @property
    def has_box(self) -> bool:
        return self.box is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["box"] = list(self.box) if self.box is not None else None
        d["points"] = [list(p) for p in self.points] if self.points is not None else None
        return d


def _strip_fences(text: str) -> str:
    m = _FENCE_RE.search(text)
    return m.group(1) if m else text


def _first_json_span(text: str) -> str | None:
    """The first balanced {...} or [...] span, ignoring brackets inside quotes."""
    start = None
    depth = 0
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
            continue
        if ch in "\"'" and start is not None:
            quote = ch
        elif ch in "{[":
            if start is None:
                start = i
            depth += 1
        elif ch in "}]" and start is not None:
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return text[start:] if start is not None else None


def _load_object(text: str) -> tuple[Any, str | None]:
    """Decode JSON-ish text; return (value, None) or (None, reason)."""
    candidates = [text, text.replace("'", '"')]
    for cand in list(candidates):
        candidates.append(_TRAILING_COMMA_RE.sub(r"\1", cand))
    for cand in candidates:
        try:
            return json.loads(cand), None
        except (ValueError, TypeError):
            pass
    try:
        return ast.literal_eval(text), None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return None, "answer is not valid JSON"


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _numbers(v: Any, n: int) -> tuple[float, ...] | None:
    if isinstance(v, dict):  # {"x": .., "y": ..} style points
        keys = ("x", "y") if n == 2 else ("x1", "y1", "x2", "y2")
        v = [v.get(k) for k in keys]
    if isinstance(v, (list, tuple)) and n == 4 and len(v) == 2 and all(
        isinstance(p, (list, tuple)) for p in v
    ):
        v = [*v[0], *v[1]]  # [[x1, y1], [x2, y2]]
    if not isinstance(v, (list, tuple)) or len(v) != n:
        return None
    out = tuple(_number(x) for x in v)
    return None if any(x is None for x in out) else out  # type: ignore[return-value]


def _pick(obj: dict, keys: tuple[str, ...]) -> tuple[bool, Any]:
    lowered = {str(k).lower().strip(): v for k, v in obj.items()}
    for k in keys:
        if k in lowered:
            return True, lowered[k]
    return False, None


def parse_completion(text: Any, image_size: tuple[int, int] | None = None) -> ParsedAnswer:
    """Parse one completion. ``image_size`` = (width, height) enables clipping to the image."""
    try:
        return _parse(text, image_size)
    except Exception as exc:  # noqa: BLE001 - model output must never crash the caller
        return ParsedAnswer(AnswerStatus.BAD_JSON, message=f"unparseable output ({exc})", raw=str(text))


def _parse(text: Any, image_size: tuple[int, int] | None) -> ParsedAnswer:
    raw = text if isinstance(text, str) else ("" if text is None else str(text))
    repairs: list[str] = []
    tm = _THINK_RE.search(raw)
    think = tm.group(1).strip() if tm else None

    answers = _ANSWER_RE.findall(raw)
    if answers:
        body = answers[0]
        if len(answers) > 1:
            repairs.append("multiple <answer> blocks: used the first")
    else:
        om = _OPEN_ANSWER_RE.search(raw)
        if om:
            body = om.group(1)
            repairs.append("missing </answer>: read to the end")
        else:
            # No tags: accept a bare JSON object only if it carries a box key.
            rest = _THINK_RE.sub("", raw)
            span = _first_json_span(_strip_fences(rest))
            if span and any(k in span.lower() for k in ("bbox", "box")):
                body = span
                repairs.append("no <answer> tags: used the bare JSON object")
            else:
                return ParsedAnswer(AnswerStatus.NO_ANSWER, think, message="no <answer> block", raw=raw)

    body = _strip_fences(body).strip()
    span = _first_json_span(body)
    if not span:
        return ParsedAnswer(AnswerStatus.BAD_JSON, think, repairs=repairs,
                            message="the <answer> block holds no JSON object", raw=raw)
    obj, err = _load_object(span)
    if isinstance(obj, list):
        dicts = [o for o in obj if isinstance(o, dict)]
        if not dicts:
            return ParsedAnswer(AnswerStatus.BAD_JSON, think, repairs=repairs,
                                message="the answer is a list without objects", raw=raw)
        if len(obj) > 1:
            repairs.append("answer is a list: used its first object")
        obj = dicts[0]
    if not isinstance(obj, dict):
        return ParsedAnswer(AnswerStatus.BAD_JSON, think, repairs=repairs,
                            message=err or "the answer is not a JSON object", raw=raw)

    has_box, box_v = _pick(obj, BOX_KEYS)
    has_p1, p1_v = _pick(obj, POINT1_KEYS)
    has_p2, p2_v = _pick(obj, POINT2_KEYS)
    if not (has_p1 and has_p2):
        has_list, plist = _pick(obj, POINT_LIST_KEYS)
        if has_list and isinstance(plist, (list, tuple)) and len(plist) >= 2 and isinstance(
            plist[0], (list, tuple, dict)
        ):
            has_p1, p1_v, has_p2, p2_v = True, plist[0], True, plist[1]
            if len(plist) > 2:
                repairs.append(f"{len(plist)} points given: used the first two")

    missing = [name for name, present in (("bbox", has_box), ("points_1", has_p1), ("points_2", has_p2))
               if not present]
    box = _numbers(box_v, 4) if has_box else None
    p1 = _numbers(p1_v, 2) if has_p1 else None
    p2 = _numbers(p2_v, 2) if has_p2 else None

    problems: list[str] = []
    if has_box and box is None:
        problems.append(f"bbox is not 4 finite numbers: {box_v!r}")
    if has_p1 and p1 is None:
        problems.append(f"points_1 is not 2 finite numbers: {p1_v!r}")
    if has_p2 and p2 is None:
        problems.append(f"points_2 is not 2 finite numbers: {p2_v!r}")

    if box is not None:
        box, swapped = geometry.order_box(box)
        if swapped:
            repairs.append("box corners were inverted: reordered")
        if image_size is not None:
            w, h = image_size
            if geometry.box_inside_fraction(box, w, h) == 0.0 and geometry.box_area(box) > 0:
                problems.append(f"bbox {list(box)} lies entirely outside the {w}x{h} image")
                box = None
            else:
                box, clipped = geometry.clip_box(box, w, h)
                if clipped:
                    repairs.append("box clipped to the image")
        if box is not None and geometry.box_area(box) <= 0:
            problems.append(f"bbox {list(box)} has zero area")
            box = None

    points = None
    if p1 is not None and p2 is not None:
        points = [p1, p2]
        if image_size is not None:
            w, h = image_size
            clipped_pts = [geometry.clip_point(p, w, h) for p in points]
            if any(c for _, c in clipped_pts):
                repairs.append("key points clipped to the image")
            points = [p for p, _ in clipped_pts]

    if missing:
        status = AnswerStatus.MISSING_KEYS
        problems.insert(0, "missing key(s): " + ", ".join(missing))
    elif problems:
        status = AnswerStatus.INVALID_VALUES
    else:
        status = AnswerStatus.OK
    return ParsedAnswer(status, think, box, points, repairs, "; ".join(problems), raw)


# -- the reference evaluation's strict extraction -----------------------------------------------------
#
# What PRIS-CV/MedReasoner's eval/utils.py (extract_think_bbox_points) and eval/eval.py accept, with no
# repairs: the first "<answer>" that is followed (after optional white space) by "{", up to the shortest
# "}" that is followed (after optional white space) by "</answer>"; case-sensitive tags; every single
# quote turned into a double quote; the first JSON value decoded with json's raw_decode (trailing text
# ignored); the keys exactly "bbox", "points_1", "points_2". A sample fails when any of that raises, or
# when the reference's IoU / pDice arithmetic raises on the values (a missing key, strings, wrong
# lengths); then every metric of the sample is 0. Values are never reordered, clipped or converted.

_REF_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_REF_ANSWER_RE = re.compile(r"<answer>\s*(\{.*?\})\s*</answer>", re.DOTALL)
REFERENCE_THINK_FAILED = "error"  # the think text the reference stores for a failed sample


@dataclass
class ReferenceAnswer:
    """A completion read by the reference evaluation's rules: raw JSON values, or a failure."""

    failure: str | None  # why the reference would score this sample as a failure; None when it scores it
    think: str | None = None  # the <think> text (None without one), as the reference keeps it
    box: Any = None  # the raw "bbox" value (not reordered, clipped or converted)
    points: list[Any] | None = None  # [raw "points_1", raw "points_2"]
    notes: list[str] = field(default_factory=list)  # what the robust parser would have treated differently
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None

    def asm_prompt(self) -> tuple[tuple[float, ...], list[tuple[float, float]]] | None:
        """(box, [p1, p2]) as the reference's statistic.py gives them to the ASM, or None when its
        SAM2 call raises (a failure; points that are not two (x, y) pairs). Labels are [1, 1]."""
        if not self.ok:
            return None
        pts = _float_array(self.points)
        if pts is None or pts.shape != (2, 2):
            return None
        return tuple(float(v) for v in self.box), [(float(x), float(y)) for x, y in pts]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failure": self.failure, "think": self.think, "box": _plain(self.box),
                "points": _plain(self.points), "notes": list(self.notes)}


def _float_array(value: Any) -> np.ndarray | None:
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """JSON-safe copy of a decoded value (NaN/Infinity become strings, so records stay valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def reference_disc(p1: Any, p2: Any) -> tuple[Any, Any, Any]:
    """(cx, cy, r) of the disc spanned by two key points, with the reference's numpy arithmetic
    (``np.array([p1, p2])``, centre = half sums of the first two coordinates, r = half the norm of
    the difference). Raises exactly where the reference raises (None, strings, ragged or flat values);
    odd shapes it accepts (e.g. each point given as [[x, y], [x, y]]) give what it computes."""
    arr = np.array([p1, p2])
    a, b = arr[0], arr[1]
    cx = (a[0] + b[0]) / 2
    cy = (a[1] + b[1]) / 2
    r = np.linalg.norm(np.array(a) - np.array(b)) / 2
    return cx, cy, r


def _reference_box_problem(box: Any) -> str | None:
    if box is None:
        return "no 'bbox' key"
    if not isinstance(box, list) or len(box) != 4:
        return f"'bbox' is not a list of 4 values: {_short(box)}"
    if not all(isinstance(v, (int, float)) for v in box):  # bool is an int, as in the reference
        return f"'bbox' holds a value that is not a JSON number: {_short(box)}"
    return None


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_answer_reference(text: Any, image_size: tuple[int, int] | None = None, *,
                           think: bool = True) -> ReferenceAnswer:
    """Read a completion by the reference evaluation's rules (module comment above); never raises.

    ``image_size`` = (width, height) only adds ``notes`` (inverted, zero-area or outside boxes are
    scored as given). ``think=False`` is the reference's direct-prompt mode (think text "")."""
    raw = text if isinstance(text, str) else ("" if text is None else str(text))
    if think:
        tm = _REF_THINK_RE.search(raw)
        think_text = tm.group(1).strip() if tm else None
    else:
        think_text = ""
    m = _REF_ANSWER_RE.search(raw)
    if m is None:
        return ReferenceAnswer("no '<answer>{...}</answer>' block (case-sensitive tags, the object right after "
                               "<answer> and right before </answer>)", think_text, raw=raw)
    body = m.group(1).strip().replace("'", '"')
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except ValueError as exc:
        return ReferenceAnswer(f"the answer is not JSON after swapping quotes ({exc})", think_text, raw=raw)
    if not isinstance(obj, dict):  # cannot happen for text starting with "{"; kept for safety
        return ReferenceAnswer("the answer is not a JSON object", think_text, raw=raw)
    box, points = obj.get("bbox"), [obj.get("points_1"), obj.get("points_2")]
    out = ReferenceAnswer(None, think_text, box, points, raw=raw)
    problem = _reference_box_problem(box)
    if problem is None:
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference_disc(*points)
        except Exception as exc:  # noqa: BLE001 - the reference's arithmetic raised: a failure
            missing = [k for k, v in zip(("points_1", "points_2"), points) if v is None]
            problem = (f"no {' or '.join(repr(k) for k in missing)} key" if missing else
                       f"the key points are not usable by the reference's pDice ({type(exc).__name__}: {exc})")
    if problem is not None:
        out.failure = problem
        return out
    out.notes = _reference_notes(box, points, image_size)
    return out


def _reference_notes(box: list, points: list, image_size: tuple[int, int] | None) -> list[str]:
    notes = []
    x1, y1, x2, y2 = (float(v) for v in box)
    if any(isinstance(v, bool) for v in box):
        notes.append("booleans in 'bbox' are used as 0/1")
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        notes.append("non-finite value in 'bbox'")
    elif x2 < x1 or y2 < y1:
        notes.append("inverted corners kept as given (the reference's IoU is 0)")
    elif (x2 - x1) * (y2 - y1) == 0:
        notes.append("zero-area box kept as given (IoU 0)")
    elif image_size is not None:
        w, h = image_size
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            notes.append(f"box entirely outside the {w}x{h} image, scored as given")
        elif x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            notes.append(f"box partly outside the {w}x{h} image, not clipped")
    pts = _float_array(points)
    shape = None if pts is None else pts.shape
    if shape != (2, 2):
        notes.append(f"key points of shape {shape} (the reference's pDice uses them as numpy arrays; its SAM2 "
                     "call fails, so Dice is 0)")
    return notes
