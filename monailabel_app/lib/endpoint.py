"""``POST /infer/{model}``, swapped in for MONAI Label 0.8.5's own route at app start.

Why: 0.8.5 declares that route ``async`` yet runs inference synchronously inside it, so one request
blocks the event loop: requests run one at a time and even ``/info/`` waits; a malformed ``params``
JSON or a missing image becomes HTTP 500; any path on the server is accepted as ``image``. This route
keeps the same form fields, query parameters and multipart answer (the stock Slicer client and
``monailabel.client.MONAILabelClient`` work unchanged) but is a plain ``def``, so FastAPI runs each
request in its worker threads, and checks the request first (4xx with a one-line message).
"""

import hashlib
import json
import logging
import os
import re

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from medreasoner.constants import IMAGE_SUFFIXES, VOLUME_SUFFIXES

logger = logging.getLogger(__name__)

UPLOAD_SUFFIXES = tuple(sorted(VOLUME_SUFFIXES + IMAGE_SUFFIXES, key=len, reverse=True))
# set by the server only: a client naming them could point the task at any file
RESERVED_PARAMS = ("image", "image_name", "model", "label", "session", "file")
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def install(fastapi_app) -> bool:
    """Replace the stock ``POST /infer/{model}`` in place (routes match in order). False if absent.

    Older FastAPI copies an included router's routes into the app; newer FastAPI keeps the included
    router by reference (``original_router``), so both places are searched.
    """
    for router in _routers(fastapi_app.router):
        for i, route in enumerate(router.routes):
            if isinstance(route, APIRoute) and "POST" in route.methods and route.path.endswith("/infer/{model}"):
                router.routes[i] = APIRoute(route.path, infer, methods=["POST"], tags=["Infer"],
                                            summary=f"{RBAC_USER}Run Inference for supported model",
                                            responses=route.responses)
                getattr(router, "_mark_routes_changed", lambda: None)()  # FastAPI versions that cache routes
                fastapi_app.openapi_schema = None
                return True
    logger.warning("medreasoner: no POST /infer/{model} route to replace; MONAI Label's own route stays")
    return False


def _routers(router):
    yield router
    for route in router.routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routers(inner)


def parse_params(params: str) -> dict:
    try:
        value = json.loads(params) if params and params.strip() else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"params is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    if not isinstance(value, dict):
        raise HTTPException(400, f"params must be a JSON object, got {type(value).__name__}")
    reserved = sorted(set(value) & set(RESERVED_PARAMS))
    if reserved:
        raise HTTPException(400, f"params may not set {', '.join(reserved)}: give the image as ?image=<id> "
                                 "or upload it as the form field 'file'")
    return value


def upload_suffix(filename: str | None) -> str:
    name = os.path.basename(filename or "").lower()
    suffix = next((s for s in UPLOAD_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
    if suffix is None:
        raise HTTPException(415, f"unsupported upload {os.path.basename(filename or '') or '(no file name)'!r}: "
                                 f"send an image file named *{', *'.join(UPLOAD_SUFFIXES)}")
    return suffix


def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: ResultType | None = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    instance = app_instance()
    request = parse_params(params)
    models = instance.infer_names()
    if model not in models:
        raise HTTPException(404, f"no model {model!r} on this server; models: {', '.join(models)}")
    if output == ResultType.dicom_seg:
        raise HTTPException(400, "output=dicom_seg needs a DICOMweb datastore; ask for image, json or all")
    if not (file or image or session_id):
        raise HTTPException(400, "no image: give ?image=<id> (GET /datastore/?output=all lists them) "
                                 "or upload the image as the form field 'file'")
    upload, same_as = None, None
    if file:
        upload = instance.new_upload_path(upload_suffix(file.filename))
        same_as = _save(file.file, upload)  # equal uploads are the same image (they take turns)
        source, name = upload, os.path.basename(file.filename)
    elif session_id:
        source, name = _session_image(instance, session_id), session_id
        same_as = source
    else:
        source, name = image, image
    request = {**request, "model": model, "image": source, "image_name": name}
    try:
        with instance.trusted(source if (upload or session_id) else None, same_as):
            result = instance.infer(request)
    finally:
        if upload:
            os.unlink(upload)
    if result is None:
        raise HTTPException(500, "inference returned nothing")
    return send_response(instance.datastore(), result, output, background_tasks)


def _save(stream, path: str) -> str:
    """Copy an upload to ``path``; returns the SHA-256 of its bytes."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    return "sha256:" + digest.hexdigest()


def _session_image(instance, session_id: str) -> str:
    if not SESSION_ID.fullmatch(session_id) or ".." in session_id:
        raise HTTPException(400, f"malformed session_id {session_id!r}")
    sessions = instance.sessions()
    session = sessions.get_session(session_id) if sessions is not None else None
    if session is None:
        raise HTTPException(404, f"unknown or expired session_id {session_id!r}")
    return session.image

