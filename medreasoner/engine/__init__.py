"""The engine: one session API every front end adapts (see ``session.py``)."""

from medreasoner.engine.batch import Case, CaseSummary, exit_code, run_cases
from medreasoner.engine.events import CallbackEvents, CancelToken, Events, JsonLinesEvents, Stage
from medreasoner.engine.results import ImageResult, VolumeResult, result_schema, validate_record
from medreasoner.engine.session import RunOptions, Session, check_query, is_volume_input
from medreasoner.engine.writer import StemAllocator, case_stem, write_result
from medreasoner.models.loading import ModelOptions, Models, load_models

__all__ = [
    "CallbackEvents", "CancelToken", "Case", "CaseSummary", "Events", "ImageResult", "JsonLinesEvents",
    "ModelOptions", "Models", "RunOptions", "Session", "Stage", "StemAllocator", "VolumeResult",
    "case_stem", "check_query", "exit_code", "is_volume_input", "load_models", "result_schema", "run_cases",
    "validate_record", "write_result",
]
