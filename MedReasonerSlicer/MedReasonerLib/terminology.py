"""Segment names, colours and DICOM terminology entries from the questions asked.

A question that names a known structure ("... the left kidney ...") gets that structure's SNOMED CT
terminology entry (Slicer's serialised format) and its usual colour; any other question gets the
next colour of a palette that keeps neighbouring segments apart.
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

# (words that name it, SNOMED CT code, meaning, category, colour 0-1)
STRUCTURES = [
    (("liver", "hepatic"), "10200004", "Liver", ANATOMICAL_STRUCTURE, (0.87, 0.51, 0.39)),
    (("spleen", "splenic"), "78961009", "Spleen", ANATOMICAL_STRUCTURE, (0.62, 0.41, 0.64)),
    (("kidney", "renal"), "64033007", "Kidney", ANATOMICAL_STRUCTURE, (0.73, 0.41, 0.34)),
    (("pancreas", "pancreatic"), "15776009", "Pancreas", ANATOMICAL_STRUCTURE, (0.98, 0.82, 0.42)),
    (("gallbladder", "gall bladder"), "28231008", "Gallbladder", ANATOMICAL_STRUCTURE, (0.55, 0.76, 0.36)),
    (("stomach", "gastric"), "69695003", "Stomach", ANATOMICAL_STRUCTURE, (0.85, 0.73, 0.60)),
    (("lung", "pulmonary"), "39607008", "Lung", ANATOMICAL_STRUCTURE, (0.77, 0.68, 0.71)),
    (("heart", "cardiac", "ventricle"), "80891009", "Heart", ANATOMICAL_STRUCTURE, (0.81, 0.27, 0.33)),
    (("aorta", "aortic"), "15825003", "Aorta", ANATOMICAL_STRUCTURE, (0.88, 0.38, 0.38)),
    (("bladder",), "89837001", "Urinary bladder", ANATOMICAL_STRUCTURE, (0.85, 0.73, 0.40)),
    (("prostate",), "41216001", "Prostate", ANATOMICAL_STRUCTURE, (0.90, 0.72, 0.52)),
    (("brain", "cerebral", "cerebrum"), "12738006", "Brain", ANATOMICAL_STRUCTURE, (0.98, 0.98, 0.88)),
    (("tumour", "tumor", "neoplasm", "mass", "cancer", "lesion", "nodule"), "108369006", "Neoplasm",
     ALTERED_STRUCTURE, (0.56, 0.93, 0.56)),
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
    """(code, meaning, category, colour, modifier) of the first structure the question names, or None."""
    words = _words(question)
    for names, code, meaning, category, colour in STRUCTURES:
        for name in names:
            at = words.find(f" {name} ")
            if at < 0 and f" {name}s " in words:  # plural ("kidneys")
                at = words.find(f" {name}s ")
            if at >= 0:
                before = words[max(0, at - 8): at + 1]
                modifier = LEFT if " left " in before else RIGHT if " right " in before else None
                return code, meaning, category, colour, modifier
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
    found = known_structure(question)
    if found is not None:
        code, meaning, category, colour, modifier = found
        modifier_text = _code(modifier) if modifier else "^^"
        entry = "~".join([CONTEXT, _code(category), _code(("SCT", code, meaning)), modifier_text,
                          ANATOMY_CONTEXT, "^^", "^^"])
        if colour in taken_colours:  # two questions about the same organ must still look different
            colour = _distinct(taken_colours, index)
        return SegmentStyle(name, colour, entry, meaning)
    return SegmentStyle(name, _distinct(taken_colours, index), None, None)


def _distinct(taken: list[Colour], index: int) -> Colour:
    for k in range(len(PALETTE)):
        colour = PALETTE[(index + k) % len(PALETTE)]
        if colour not in taken:
            return colour
    # every palette colour used: darken one, so it still differs from the others
    base = PALETTE[index % len(PALETTE)]
    shade = 0.85 ** (1 + len(taken) // len(PALETTE))
    return (base[0] * shade, base[1] * shade, base[2] * shade)
