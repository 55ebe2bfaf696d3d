"""MONAI Label app: a free-text clinical question about a 2D image or 3D volume -> a segmentation.

    monailabel start_server --app monailabel_app --studies STUDIES --host 127.0.0.1 --port 8000 \\
        --conf crm models/MedReasoner-Soft-7B --conf asm litemedsam --conf device cuda

One model set is loaded at start (``lib/configs``) and shared by every request through one thread-safe
``medreasoner`` session; ``lib/infers`` is the task, ``lib/endpoint.py`` the checked, threaded infer
route. See README.md beside this file.
"""

import atexit
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

from fastapi import HTTPException
from lib.configs import MedReasonerConfig
from lib.endpoint import install as install_infer_route
from lib.infers.medreasoner import public_models
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

import medreasoner
from medreasoner.errors import InputError, MedReasonerError

logger = logging.getLogger(__name__)

TASK = "medreasoner"
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class MedReasonerApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.task_config = MedReasonerConfig()
        try:
            self.task_config.init(TASK, os.path.join(app_dir, "model"), conf or {})
        except MedReasonerError as exc:
            # one readable line in the server log, and the server exits instead of half-starting
            logger.error("medreasoner app cannot start: %s", exc)
            raise RuntimeError(f"medreasoner app cannot start: {exc}") from None
        super().__init__(app_dir=app_dir, studies=studies, conf=conf or {}, name="MedReasoner",
                         description="Reasoning grounding: a clinical question -> box + key points -> mask",
                         version=medreasoner.__version__, labels=["target"])
        self.max_concurrent = settings.MONAI_LABEL_INFER_CONCURRENCY
        if self.max_concurrent < 0:
            # MONAI Label's default runs inference in the request's own thread, unbounded; a pool bounds it
            self.max_concurrent = self.task_config.max_concurrent
            self._infers_threadpool = ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="INFER")
        self._studies_root = os.path.realpath(studies)
        self._uploads = tempfile.mkdtemp(prefix="medreasoner-uploads-")
        atexit.register(shutil.rmtree, self._uploads, True)
        self._trusted: dict[str, str] = {}  # server-made path -> what identifies its image
        self._trusted_lock = threading.Lock()
        self._turns: dict[str, list] = {}  # image -> [lock, requests holding or waiting for it]
        self._turns_lock = threading.Lock()
        server = sys.modules.get("monailabel.app")  # imported by uvicorn; absent for the monailabel CLI
        replace = str((conf or {}).get("replace_infer_route", "true")).lower() not in ("0", "false", "no")
        self.route_installed = bool(replace and server is not None and install_infer_route(server.app))
        logger.info("medreasoner app ready: %d request(s) at once, threaded infer route: %s",
                    self.max_concurrent, self.route_installed)

    def init_infers(self):
        return self.task_config.infer()

    def init_trainers(self):
        return {}

    def init_strategies(self):
        return {}

    def info(self):
        meta = super().info()
        models = self.task_config.models
        meta["medreasoner"] = {"crm": public_models(models.crm.describe()), "asm": public_models(models.asm.describe()),
                               "tiny_test_model": models.is_tiny, "plugins": self.task_config.plugins,
                               "max_concurrent": self.max_concurrent, "threaded_infer_route": self.route_installed}
        return meta

    def infer_names(self) -> list[str]:
        return [k for k, v in self._infers.items() if v.is_valid()]

    # -- request images ---------------------------------------------------------------------------
    def new_upload_path(self, suffix: str) -> str:
        return os.path.join(self._uploads, uuid.uuid4().hex + suffix)

    @contextlib.contextmanager
    def trusted(self, path, same_as=None):
        """Mark a server-made path (an upload, a session's image) as usable for this request only;
        ``same_as`` names its content (equal uploads are one image for taking turns)."""
        if path is None:
            yield
            return
        with self._trusted_lock:
            self._trusted[path] = same_as or path
        try:
            yield
        finally:
            with self._trusted_lock:
                self._trusted.pop(path, None)

    @contextlib.contextmanager
    def image_turn(self, key: str):
        """Questions about one image take turns; different images run side by side. Why: two requests
        racing on a new image would both encode its slices (the session's embedding cache is checked
        before the ASM lock); in turn, the second reuses the first one's embeddings."""
        with self._turns_lock:
            entry = self._turns.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._turns_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._turns[key]

    def _inside_studies(self, path: str) -> bool:
        real = os.path.realpath(path)
        return os.path.commonpath([self._studies_root, real]) == self._studies_root

    def image_path(self, image) -> str:
        """The file a request's ``image`` names: a datastore id (or a file name) inside the studies
        folder, or a path this server made itself. Anything else is a 4xx."""
        with self._trusted_lock:
            if isinstance(image, str) and image in self._trusted:
                return image
        if not isinstance(image, str) or not image.strip():
            raise HTTPException(400, "no image given")
        text = image.strip()
        parts = text.replace("\\", "/").split("/")
        if text.startswith(("/", "\\")) or WINDOWS_DRIVE.match(text) or ".." in parts or "\x00" in text:
            hint = "" if self.route_installed else " (uploads need the app's infer route: replace_infer_route is off)"
            raise HTTPException(400, f"image {text!r} is not an image id: ids name images inside the studies "
                                     f"folder (no absolute paths, no '..'){hint}")
        uri = self.datastore().get_image_uri(text)
        if not uri:
            candidate = os.path.join(self._studies_root, text)
            uri = candidate if os.path.isfile(candidate) else ""
        if not uri:
            raise HTTPException(404, f"unknown image id {text!r}; GET /datastore/?output=all lists the images")
        if not self._inside_studies(uri):
            raise HTTPException(400, f"image {text!r} resolves outside the studies folder")
        return uri

    def infer(self, request, datastore=None):
        request = dict(request)
        request.setdefault("image_name", request.get("image"))
        request["image"] = self.image_path(request.get("image"))
        with self._trusted_lock:
            same_image = self._trusted.get(request["image"], request["image"])
        try:
            with self.image_turn(same_image):  # waits in the request's thread, not in an inference worker
                return super().infer(request, datastore)
        except HTTPException:
            raise
        except InputError as exc:  # bad query, options, or an unreadable image: the client's to fix
            raise HTTPException(400, str(exc)) from None
        except MONAILabelException as exc:
            code = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
            raise HTTPException(code, exc.msg) from None
        except FuturesTimeout:
            raise HTTPException(504, f"inference did not finish within {settings.MONAI_LABEL_INFER_TIMEOUT} s "
                                     "(MONAI_LABEL_INFER_TIMEOUT)") from None
        except Exception as exc:
            logger.exception("medreasoner inference failed")
            raise HTTPException(500, f"inference failed: {type(exc).__name__}: {exc}") from None
