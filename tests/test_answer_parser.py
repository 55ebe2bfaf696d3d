"""The answer parser on completions the way real models write them."""

import math

import pytest

from medreasoner.models.answer import AnswerStatus, parse_completion

OK, NO, BAD, MISS, INV = (AnswerStatus.OK, AnswerStatus.NO_ANSWER, AnswerStatus.BAD_JSON,
                          AnswerStatus.MISSING_KEYS, AnswerStatus.INVALID_VALUES)
BOX = (10.0, 20.0, 110.0, 220.0)
PTS = [(50.0, 60.0), (70.0, 90.0)]

CASES = [
    # id, completion, status, box, points
    ("reference single quotes",
     "<think>The liver is the large organ.</think><answer>{'bbox': [10, 20, 110, 220], 'points_1': [50, 60], 'points_2': [70, 90]}</answer>",
     OK, BOX, PTS),
    ("double quotes", '<think>t</think><answer>{"bbox": [10, 20, 110, 220], "points_1": [50, 60], "points_2": [70, 90]}</answer>',
     OK, BOX, PTS),
    ("whitespace and newlines", "<think>\n a \n</think>\n<answer>\n{ 'bbox' : [ 10 , 20 , 110 , 220 ] ,\n 'points_1': [50,60], 'points_2': [70,90] }\n</answer>\n",
     OK, BOX, PTS),
    ("code fence in answer", "<think>t</think><answer>```json\n{\"bbox\": [10, 20, 110, 220], \"points_1\": [50, 60], \"points_2\": [70, 90]}\n```</answer>",
     OK, BOX, PTS),
    ("text around tags", "Sure, here it is.\n<think>t</think><answer>{'bbox': [10, 20, 110, 220], 'points_1': [50, 60], 'points_2': [70, 90]}</answer> Hope this helps!",
     OK, BOX, PTS),
    ("floats", "<think>t</think><answer>{'bbox': [10.0, 20.0, 110.0, 220.0], 'points_1': [50.0, 60.0], 'points_2': [70.0, 90.0]}</answer>",
     OK, BOX, PTS),
    ("numbers as strings", "<answer>{'bbox': ['10', '20', '110', '220'], 'points_1': ['50', '60'], 'points_2': ['70', '90']}</answer>",
     OK, BOX, PTS),
    ("qwen bbox_2d/point_2d", '<answer>{"bbox_2d": [10, 20, 110, 220], "point_2d": [[50, 60], [70, 90]]}</answer>',
     OK, BOX, PTS),
    ("list of objects", '<answer>[{"bbox_2d": [10, 20, 110, 220], "points_1": [50, 60], "points_2": [70, 90], "label": "liver"}]</answer>',
     OK, BOX, PTS),
    ("bare json in fence, no tags", 'The target:\n```json\n{"bbox_2d": [10, 20, 110, 220], "point_2d": [[50, 60], [70, 90]]}\n```',
     OK, BOX, PTS),
    ("missing closing tag (truncated)", "<think>t</think><answer>{'bbox': [10, 20, 110, 220], 'points_1': [50, 60], 'points_2': [70, 90]}",
     OK, BOX, PTS),
    ("trailing comma", '<answer>{"bbox": [10, 20, 110, 220], "points_1": [50, 60], "points_2": [70, 90],}</answer>',
     OK, BOX, PTS),
    ("python tuples", "<answer>{'bbox': (10, 20, 110, 220), 'points_1': (50, 60), 'points_2': (70, 90)}</answer>",
     OK, BOX, PTS),
    ("upper-case tags and keys", "<THINK>t</THINK><ANSWER>{'BBOX': [10, 20, 110, 220], 'Points_1': [50, 60], 'points_2': [70, 90]}</ANSWER>",
     OK, BOX, PTS),
    ("box as two corners", "<answer>{'bbox': [[10, 20], [110, 220]], 'points_1': [50, 60], 'points_2': [70, 90]}</answer>",
     OK, BOX, PTS),
    ("inverted corners repaired", "<answer>{'bbox': [110, 220, 10, 20], 'points_1': [50, 60], 'points_2': [70, 90]}</answer>",
     OK, BOX, PTS),
    ("two answer blocks: first wins", "<answer>{'bbox': [10, 20, 110, 220], 'points_1': [50, 60], 'points_2': [70, 90]}</answer><answer>{'bbox': [0, 0, 1, 1]}</answer>",
     OK, BOX, PTS),
    ("no answer at all", "<think>I am not sure what this shows.</think>", NO, None, None),
    ("empty string", "", NO, None, None),
    ("none", None, NO, None, None),
    ("answer not json", "<think>t</think><answer>the liver, top left</answer>", BAD, None, None),
    ("broken json", "<answer>{'bbox': [10, 20, 110, 220], 'points_1': [50, 60</answer>", BAD, None, None),
    ("missing points", "<answer>{'bbox': [10, 20, 110, 220]}</answer>", MISS, BOX, None),
    ("missing box", "<answer>{'points_1': [50, 60], 'points_2': [70, 90]}</answer>", MISS, None, PTS),
    ("box with 3 numbers", "<answer>{'bbox': [10, 20, 110], 'points_1': [50, 60], 'points_2': [70, 90]}</answer>", INV, None, PTS),
    ("nan in box", "<answer>{\"bbox\": [10, 20, NaN, 220], \"points_1\": [50, 60], \"points_2\": [70, 90]}</answer>", INV, None, PTS),
    ("text in point", "<answer>{'bbox': [10, 20, 110, 220], 'points_1': ['left', 60], 'points_2': [70, 90]}</answer>", INV, BOX, None),
    ("zero-area box", "<answer>{'bbox': [10, 20, 10, 220], 'points_1': [50, 60], 'points_2': [70, 90]}</answer>", INV, None, PTS),
    ("boolean values", "<answer>{'bbox': [true, 20, 110, 220], 'points_1': [50, 60], 'points_2': [70, 90]}</answer>", INV, None, PTS),
]


@pytest.mark.parametrize("completion,status,box,points", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parser_table(completion, status, box, points):
    got = parse_completion(completion)
    assert got.status is status, got.message
    assert got.box == box
    assert got.points == points
    assert isinstance(got.to_dict()["status"], str)


def test_think_text_is_extracted():
    got = parse_completion("<think>  The heart is enlarged. </think><answer>{'bbox': [1, 2, 3, 4], 'points_1': [2, 3], 'points_2': [2, 3]}</answer>")
    assert got.think == "The heart is enlarged."


def test_inverted_box_is_recorded_as_repair():
    got = parse_completion("<answer>{'bbox': [110, 220, 10, 20], 'points_1': [50, 60], 'points_2': [70, 90]}</answer>")
    assert any("inverted" in r for r in got.repairs)


def test_clipping_to_image_is_recorded():
    got = parse_completion("<answer>{'bbox': [-5, 10, 130, 90], 'points_1': [50, 60], 'points_2': [140, 90]}</answer>",
                           image_size=(100, 80))
    assert got.status is OK
    assert got.box == (0.0, 10.0, 100.0, 80.0)
    assert got.points[1] == (100.0, 80.0)
    assert "box clipped to the image" in got.repairs and "key points clipped to the image" in got.repairs


def test_box_entirely_outside_image_is_invalid():
    got = parse_completion("<answer>{'bbox': [200, 200, 300, 300], 'points_1': [250, 250], 'points_2': [260, 260]}</answer>",
                           image_size=(100, 100))
    assert got.status is INV and got.box is None
    assert "outside" in got.message


@pytest.mark.parametrize("junk", [123, b"<answer>", ["<answer>"], "<answer>" * 1000, "{" * 5000, "<answer>[[[[[</answer>"])
def test_never_raises(junk):
    got = parse_completion(junk)
    assert got.status in set(AnswerStatus)
    assert not (got.box and any(math.isnan(v) for v in got.box))
