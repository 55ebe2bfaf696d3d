"""Segment names, colours and DICOM terminology entries from the questions asked.

A question that names a known structure ("... the left kidney ...") gets that structure's SNOMED CT
terminology entry (Slicer's serialised format). Colours come from a palette of saturated colours
that stay visible on greyscale images (anatomy colours such as the brain's near-white do not) and
keep the segments of one segmentation apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Colour = tuple[float, float, float]

NAME_CHARS = 80  # segment names longer than this are cut (the full question stays in a tag)
CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = ("SCT", "49755003", "Morphologically Altered Structure")
LEFT, RIGHT = ("SCT", "7771000", "Left"), ("SCT", "24028007", "Right")

# (words that name it, SNOMED CT code, meaning, category)
STRUCTURES = [
    (("liver", "hepatic"), "10200004", "Liver", ANATOMICAL_STRUCTURE),
    (("spleen", "splenic"), "78961009", "Spleen", ANATOMICAL_STRUCTURE),
    (("kidney", "renal"), "64033007", "Kidney", ANATOMICAL_STRUCTURE),
    (("pancreas", "pancreatic"), "15776009", "Pancreas", ANATOMICAL_STRUCTURE),
    (("gallbladder", "gall bladder"), "28231008", "Gallbladder", ANATOMICAL_STRUCTURE),
    (("stomach", "gastric"), "69695003", "Stomach", ANATOMICAL_STRUCTURE),
    (("lung", "pulmonary"), "39607008", "Lung", ANATOMICAL_STRUCTURE),
    (("heart", "cardiac", "ventricle"), "80891009", "Heart", ANATOMICAL_STRUCTURE),
    (("aorta", "aortic"), "15825003", "Aorta", ANATOMICAL_STRUCTURE),
    (("bladder",), "89837001", "Urinary bladder", ANATOMICAL_STRUCTURE),
    (("prostate",), "41216001", "Prostate", ANATOMICAL_STRUCTURE),
    (("brain", "cerebral", "cerebrum"), "12738006", "Brain", ANATOMICAL_STRUCTURE),
    (("tumour", "tumor", "neoplasm", "mass", "cancer", "lesion", "nodule"), "108369006", "Neoplasm",
     ALTERED_STRUCTURE),
]

# Colours far apart for questions that name no known structure (in order; then repeated).
PALETTE: list[Colour] = [(0.90, 0.10, 0.10), (0.10, 0.60, 0.95), (0.20, 0.80, 0.20), (1.00, 0.65, 0.00),
                         (0.60, 0.30, 0.85), (0.00, 0.80, 0.80), (0.95, 0.40, 0.70), (0.60, 0.60, 0.10)]


@dataclass
class SegmentStyle:
    name: str
    colour: Colour
    terminology: str | None  # Slicer's terminology entry string, or None
    structure: str | None  # the structure's meaning, e.g. "Liver"


def _code(c) -> str:
    return "^".join(c)


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z]+", " ", text.lower()) + " "


def known_structure(question: str):
    """(code, meaning, category, modifier) of the first structure the question names, or None."""
    words = _words(question)
    for names, code, meaning, category in STRUCTURES:
        for name in names:
            at = words.find(f" {name} ")
            if at < 0 and f" {name}s " in words:  # plural ("kidneys")
                at = words.find(f" {name}s ")
            if at >= 0:
                before = words[max(0, at - 8): at + 1]
                modifier = LEFT if " left " in before else RIGHT if " right " in before else None
                return code, meaning, category, modifier
    return None


def segment_name(question: str, taken: list[str]) -> str:
    """The question as a segment name, cut to ``NAME_CHARS`` and made unique among ``taken``."""
    base = question if len(question) <= NAME_CHARS else question[: NAME_CHARS - 1].rstrip() + "…"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base} ({k})"
    return name


def style_for(question: str, index: int, taken_names: list[str], taken_colours: list[Colour]) -> SegmentStyle:
    """Name, colour and terminology of the segment answering ``question`` (the ``index``-th new one)."""
    name = segment_name(question, taken_names)
    colour = _distinct(taken_colours, index)
    found = known_structure(question)
    if found is None:
        return SegmentStyle(name, colour, None, None)
    code, meaning, category, modifier = found
    entry = "~".join([CONTEXT, _code(category), _code(("SCT", code, meaning)), _code(modifier) if modifier else "^^",
                      ANATOMY_CONTEXT, "^^", "^^"])
    return SegmentStyle(name, colour, entry, meaning)


def _distinct(taken: list[Colour], index: int) -> Colour:
    for k in range(len(PALETTE)):
        colour = PALETTE[(index + k) % len(PALETTE)]
        if colour not in taken:
            return colour
    # every palette colour used: darken one, so it still differs from the others
    base = PALETTE[index % len(PALETTE)]
    shade = 0.85 ** (1 + len(taken) // len(PALETTE))
    return (base[0] * shade, base[1] * shade, base[2] * shade)
