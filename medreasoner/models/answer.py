"""Turn a CRM completion into a typed answer: think text, box, two key points and a status.

Tolerant of what real models emit (single-quoted or Python-literal JSON, code fences, text around
the tags, a missing closing tag, ``bbox_2d``/``point_2d`` keys, a list of objects, numbers as
strings); strict about what it returns. Safe repairs are applied and listed in ``repairs``.
``parse_completion`` never raises on model output.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

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
