"""Prompt templates for the CRM, in our words, following the reference method's structure.

Both templates ask for absolute pixel coordinates of the image exactly as the model sees it, with
the keys ``bbox``, ``points_1`` and ``points_2`` inside ``<answer>``.
"""

from __future__ import annotations

from typing import Literal

PromptKind = Literal["reasoning", "direct"]

ANSWER_EXAMPLE = "{'bbox': [xmin, ymin, xmax, ymax], 'points_1': [x1, y1], 'points_2': [x2, y2]}"

_ANSWER_KEYS = (
    "- <answer>...</answer> holds one JSON object with these keys:\n"
    '    "bbox": the tightest box around the target, [xmin, ymin, xmax, ymax];\n'
    '    "points_1": a key point on the target, inside the box, [x, y];\n'
    '    "points_2": a second, different key point on the target, [x, y].\n'
    "All coordinates are absolute pixel positions in this image.\n\n"
)

REASONING_TEMPLATE = (
    "You are localizing a target in a medical image (X-ray, CT, MRI, ultrasound, endoscopy, fundus, "
    "pathology, dermoscopy or mammography). The question only hints at the target, the way a "
    "clinician would phrase it; work out what it refers to and where it is.\n\n"
    "Question: {question}\n\n"
    "Reason step by step:\n"
    "1. Interpret the question: state the structure or finding it most likely points to, using "
    "clinical knowledge.\n"
    "2. Look for evidence: shape, borders, brightness or density, symmetry and texture that confirm "
    "or change that hypothesis.\n"
    "3. Decide on one region that best fits both the question and what is visible.\n"
    "4. Localize it: give only its position (box and key points), no diagnosis.\n"
    "5. If the image contradicts your first idea, trust the image.\n\n"
    "Output format: exactly one <think> block immediately followed by exactly one <answer> block.\n"
    "- <think>...</think> explains how the visual evidence and clinical context locate the target.\n"
    + _ANSWER_KEYS
    + "Rules: output nothing outside the two blocks; the answer is never empty; the box encloses the "
    "whole target and nothing more; the two points are distinct and lie on the target.\n\n"
    "Example: <think> reasoning here </think><answer>{example}</answer>"
)

DIRECT_TEMPLATE = (
    "Answer this question about the image with a box and two key points: {question}\n\n"
    "Output format: exactly one <answer> block.\n"
    + _ANSWER_KEYS
    + "Example: <answer>{example}</answer>"
)


def build_prompt(question: str, kind: PromptKind = "reasoning") -> str:
    """The user text that goes with one image."""
    template = {"reasoning": REASONING_TEMPLATE, "direct": DIRECT_TEMPLATE}.get(kind)
    if template is None:
        raise ValueError(f"unknown prompt kind {kind!r}; choose 'reasoning' or 'direct'")
    return template.format(question=question.strip(), example=ANSWER_EXAMPLE)


def build_messages(question: str, kind: PromptKind = "reasoning") -> list[dict]:
    """A one-turn chat in the processor's format: the image first, then the instructions."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": build_prompt(question, kind)},
            ],
        }
    ]
