"""Prompt templates for the CRM: the built-in wordings (ours) and templates a user supplies.

The built-in templates, in our words and following the reference method's structure, ask for
absolute pixel coordinates of the image exactly as the model sees it, with the keys ``bbox``,
``points_1`` and ``points_2`` inside ``<answer>``.

A checkpoint answers best with the prompt it was trained on, so a user may replace the built-in
wording with a :class:`PromptTemplate`: UTF-8 text holding exactly one ``{question}`` placeholder
(literal braces written ``{{`` and ``}}``, as in ``str.format``). It comes from, first found:

1. an explicit file (``--prompt-file``, the bundle's ``prompt_file``, MONAI Label's ``--conf prompt_file``);
2. the checkpoint's sidecar (``medreasoner_crm.json``): ``prompt_template`` (the text itself) or
   ``prompt_file`` (a file name inside the checkpoint folder);
3. the built-in ``reasoning`` / ``direct`` wording (``--prompt``).

A template replaces the built-in wording for every question. Every result records which prompt was
used: ``prompt`` (``reasoning``, ``direct`` or ``file``), ``prompt_sha256`` (of the template text as
used, placeholder included) and ``prompt_source`` (``builtin:NAME``, ``file:PATH`` or
``checkpoint:PATH``).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medreasoner.errors import InputError

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


MAX_TEMPLATE_BYTES = 64 * 1024  # a prompt is a few hundred words; anything this large is the wrong file
PLACEHOLDER = "question"
SIDECAR_TEXT_KEY = "prompt_template"  # sidecar: the template text itself
SIDECAR_FILE_KEY = "prompt_file"  # sidecar: a file name inside the checkpoint folder
FILE_PROMPT = "file"  # the record's ``prompt`` when a template (file or sidecar) replaced the built-in wording


@dataclass(frozen=True)
class PromptTemplate:
    """The user text for one image, with ``{question}`` where the question goes."""

    text: str  # checked: exactly one {question}, literal braces doubled
    source: str  # builtin:NAME | file:PATH | checkpoint:PATH
    name: str = FILE_PROMPT  # what results record as ``prompt``

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, question: str) -> str:
        return self.text.format(**{PLACEHOLDER: str(question).strip()})

    def record(self) -> dict[str, str]:
        """The fields every result carries about its prompt."""
        return {"prompt": self.name, "prompt_sha256": self.sha256, "prompt_source": self.source}


def check_template(text: str, where: str, error: type[Exception] = InputError) -> str:
    """``text`` when it is a usable template; ``error`` with one line saying what is wrong otherwise."""
    if not isinstance(text, str):
        raise error(f"prompt template {where} must be text, got {type(text).__name__}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON "\\ud800"
        raise error(f"prompt template {where} is not valid Unicode text (character {exc.start})") from exc
    if size > MAX_TEMPLATE_BYTES:
        raise error(f"prompt template {where} is {size} bytes; a template is at most {MAX_TEMPLATE_BYTES}")
    if not text.strip():
        raise error(f"prompt template {where} is empty; write the prompt with {{{PLACEHOLDER}}} where the "
                    "question goes")
    if "\x00" in text:
        raise error(f"prompt template {where} holds NUL characters; is it a binary file?")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:  # a single { or } ("Single '}' encountered in format string")
        raise error(f"prompt template {where}: {exc}; write literal braces as {{{{ and }}}}") from exc
    others = sorted({"{" + (name or "") + "}" for name, _, _ in fields if name != PLACEHOLDER})
    if others:
        raise error(f"prompt template {where} has the field(s) {', '.join(others)}; only {{{PLACEHOLDER}}} "
                    "is filled in (write literal braces as {{ and }})")
    odd = [f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}" for name, spec, conv in fields
           if spec or conv]
    if odd:
        raise error(f"prompt template {where}: write the placeholder as {{{PLACEHOLDER}}}, not {odd[0]}")
    if not fields:
        raise error(f"prompt template {where} has no {{{PLACEHOLDER}}} placeholder; put one where the question goes")
    if len(fields) > 1:
        raise error(f"prompt template {where} has {len(fields)} {{{PLACEHOLDER}}} placeholders; it needs "
                    "exactly one, where the question goes")
    return text


def _template_text(path: Path, error: type[Exception]) -> str:
    """A template file as the text used: read as every user text file is (UTF-8, BOM dropped, Windows
    line ends as ``\n``), and one final line end dropped (editors add it; prompts rarely end with one)."""
    from medreasoner.io.files import read_text_file

    text = read_text_file(path, "prompt file", MAX_TEMPLATE_BYTES, error)
    return text[:-1] if text.endswith("\n") else text


def load_prompt_file(path: str | Path) -> PromptTemplate:
    """An explicit template file (``--prompt-file``); ``InputError`` (exit 2) when it cannot be used."""
    text = str(path).strip() if path is not None else ""
    if not text:
        raise InputError("the prompt file is empty; give the path of a template file")
    p = Path(text).expanduser()
    body = check_template(_template_text(p, InputError), text)
    return PromptTemplate(body, f"file:{p.resolve()}")


def checkpoint_template(folder: str | Path, sidecar: dict[str, Any],
                        error: type[Exception] = InputError) -> PromptTemplate | None:
    """The template a checkpoint's sidecar names, or None. ``prompt_template`` is the text itself;
    ``prompt_file`` a file name inside ``folder`` (no absolute path, no ``..``); not both."""
    from medreasoner.constants import CRM_SIDECAR

    root = Path(folder).expanduser().resolve()
    where = root / CRM_SIDECAR
    has_text, has_file = sidecar.get(SIDECAR_TEXT_KEY) is not None, sidecar.get(SIDECAR_FILE_KEY) is not None
    if has_text and has_file:
        raise error(f"{where} names both {SIDECAR_TEXT_KEY} and {SIDECAR_FILE_KEY}; keep one")
    if has_text:
        body = check_template(sidecar[SIDECAR_TEXT_KEY], f"{SIDECAR_TEXT_KEY} in {where}", error)
        return PromptTemplate(body, f"checkpoint:{where}")
    if not has_file:
        return None
    name = sidecar[SIDECAR_FILE_KEY]
    if not isinstance(name, str) or not name.strip():
        raise error(f"{SIDECAR_FILE_KEY} in {where} must be a file name inside {root}, got {name!r}")
    # checked by name, not by resolving links: a hub cache snapshot links every file to a blob outside it
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(f"{SIDECAR_FILE_KEY} in {where} must name a file inside the checkpoint folder, got {name!r}")
    path = root / name
    body = check_template(_template_text(path, error), str(path), error)
    return PromptTemplate(body, f"checkpoint:{path}")


def _builtin(kind: str, template: str) -> PromptTemplate:
    example = ANSWER_EXAMPLE.replace("{", "{{").replace("}", "}}")
    text = check_template(template.replace("{example}", example), f"builtin:{kind}", ValueError)
    return PromptTemplate(text, f"builtin:{kind}", kind)


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    "reasoning": _builtin("reasoning", REASONING_TEMPLATE),
    "direct": _builtin("direct", DIRECT_TEMPLATE),
}


def builtin_template(kind: str = "reasoning") -> PromptTemplate:
    template = BUILTIN_TEMPLATES.get(kind)
    if template is None:
        raise ValueError(f"unknown prompt kind {kind!r}; choose 'reasoning' or 'direct'")
    return template


def effective_template(crm: Any, kind: str = "reasoning") -> PromptTemplate:
    """What ``crm`` asks with for the style ``kind``: its template (file or sidecar) when it has one,
    else the built-in wording. Works for any CRM object, subclass of ``CRM`` or not."""
    template = getattr(crm, "prompt_template", None)
    return template if isinstance(template, PromptTemplate) else builtin_template(kind)


def prompt_record(crm: Any, kind: str = "reasoning") -> dict[str, str]:
    """``prompt``, ``prompt_sha256`` and ``prompt_source`` for a result answered by ``crm``."""
    return effective_template(crm, kind).record()


def build_prompt(question: str, kind: PromptKind = "reasoning", template: PromptTemplate | None = None) -> str:
    """The user text that goes with one image: ``template`` when given, else the built-in ``kind``."""
    return (template or builtin_template(kind)).render(question)


def messages_for(text: str) -> list[dict]:
    """A one-turn chat in the processor's format: the image first, then the instructions."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": text},
            ],
        }
    ]


def build_messages(question: str, kind: PromptKind = "reasoning", template: PromptTemplate | None = None) -> list[dict]:
    """The chat for one (image, question): see :func:`build_prompt`."""
    return messages_for(build_prompt(question, kind, template))
