"""The module's logic without Qt: checks the input, hands the volume to a back end, returns a ``Job``.

Local runs share one worker process (models loaded once; restarted only when the model settings
change). The volume goes to it as an NRRD file written once per volume content, so asking again
about the same volume reuses the worker's caches.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from MedReasonerLib.errors import MedReasonerSlicerError
from MedReasonerLib.jobs import Job, LocalJob, RemoteJob
from MedReasonerLib.markups import LPS_TO_RAS, to_local, to_world
from MedReasonerLib.parameters import RunSettings, parse_questions
from MedReasonerLib.remote_client import RemoteClient
from MedReasonerLib.scene import AppliedSegment, remove_applied
from MedReasonerLib.worker_client import WorkerClient, WorkerCommand, worker_command

MAX_EXPORTS = 4  # volumes kept on disk for the worker's caches


class MedReasonerLogic:
    def __init__(self, scene=None, *, worker_python: str | None = None,
                 worker_env: dict[str, str] | None = None, temp_root: str | None = None):
        self._scene = scene
        self.worker_python, self.worker_env = worker_python, worker_env
        self.temp_root = tempfile.mkdtemp(prefix="MedReasoner-", dir=temp_root)
        self.worker: WorkerClient | None = None
        self._exports: dict[tuple, str] = {}
        self._export_ids = itertools.count(1)
        self.job: Job | None = None

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # -- running ---------------------------------------------------------------------------------
    def start(self, volume_node, questions: str | Sequence[str], settings: RunSettings,
              segmentation_node=None, key_point_ras: Sequence[float] | None = None) -> Job:
        """Check everything, then start the run; raises ``MedReasonerSlicerError`` with a one-line reason.

        ``key_point_ras``: a point on the slice the user looks at, in world RAS (as the views show it)."""
        if self.job is not None and not self.job.finished:
            raise MedReasonerSlicerError("a run is in progress; wait for it or cancel it")
        self.check_volume(volume_node)
        questions = parse_questions(questions if isinstance(questions, str) else "\n".join(questions))
        settings = settings.checked()
        if segmentation_node is not None and not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise MedReasonerSlicerError("the output must be a segmentation node")
        key_point_lps = None
        if key_point_ras is not None:  # the worker sees the volume's own coordinates
            key_point_lps = list(np.asarray(to_local(volume_node, key_point_ras), float) * LPS_TO_RAS)
        options = settings.run_options(key_point_lps)
        input_path = self.export_volume(volume_node)
        out_dir = tempfile.mkdtemp(prefix="run-", dir=self.temp_root)
        if settings.compute == "remote":
            client = RemoteClient(settings.server_url, settings.timeout_s)
            params = {k: _form_value(v) for k, v in options.items()}
            job: Job = RemoteJob(self.scene, volume_node, questions, segmentation_node, client,
                                 settings.server_task, input_path, out_dir, params)
        else:
            job = LocalJob(self.scene, volume_node, questions, segmentation_node, self.ensure_worker(settings),
                           input_path, out_dir, {k: v for k, v in options.items() if v is not None})
        job.on_finish.append(lambda _job: shutil.rmtree(out_dir, ignore_errors=True))
        self.job = job
        return job

    def check_volume(self, volume_node) -> None:
        if volume_node is None:
            raise MedReasonerSlicerError("choose an input volume")
        if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise MedReasonerSlicerError(f"{volume_node.GetName()} is not a scalar (greyscale) volume")
        image = volume_node.GetImageData()
        if image is None or min(image.GetDimensions()) < 1 or image.GetNumberOfScalarComponents() != 1:
            raise MedReasonerSlicerError(f"{volume_node.GetName()} has no single-channel image data")

    def export_volume(self, volume_node) -> str:
        """The volume as an NRRD the worker reads (written once per content and geometry)."""
        import slicer
        import vtk

        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(),
               tuple(m.GetElement(r, c) for r in range(4) for c in range(4)))
        path = self._exports.get(key)
        if path and os.path.exists(path):
            return path
        path = os.path.join(self.temp_root, f"volume-{next(self._export_ids)}.nrrd")  # never a name still in use
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()  # not in the scene: the node keeps its own file
        storage.SetFileName(path)
        storage.SetUseCompression(0)
        if not storage.WriteData(volume_node):
            raise MedReasonerSlicerError(f"could not write {volume_node.GetName()} to a temporary file "
                                         f"({self.temp_root})", "internal")
        self._exports[key] = path
        for old in list(self._exports)[:-MAX_EXPORTS]:
            stale = self._exports.pop(old)
            if os.path.exists(stale):
                os.remove(stale)
        return path

    def ensure_worker(self, settings: RunSettings) -> WorkerClient:
        """The running worker for these model settings; started (or restarted) when needed."""
        command: WorkerCommand = worker_command(settings, self.worker_python, self.worker_env)
        if self.worker is not None and (not self.worker.alive or self.worker.command != command):
            self.worker.shutdown()
            self.worker = None
        if self.worker is None:
            self.worker = WorkerClient(command)
        return self.worker

    def cancel(self) -> None:
        if self.job is not None and not self.job.finished:
            self.job.cancel()

    # -- results ---------------------------------------------------------------------------------
    def remove_result(self, item: AppliedSegment, segmentation_node) -> None:
        remove_applied(self.scene, segmentation_node, item)

    @staticmethod
    def jump_to_key_slice(item: AppliedSegment, segmentation_node=None) -> bool:
        """Move the slice views to the answer's key slice (centred on its box); False if it has none.

        The answer's points are in the volume's own RAS; the segmentation sits under the volume's
        transform, so its transform takes them to the world the views show."""
        if item.key_slice_ras is None:
            return False
        import slicer

        x, y, z = to_world(segmentation_node, item.key_slice_ras)
        slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)
        return True

    def reset(self) -> None:
        """Forget the scene (it is closing): cancel the run, drop exported volumes; the worker stays warm."""
        if self.job is not None and not self.job.finished:
            self.job.cancel()
        self.job = None
        for path in self._exports.values():
            if os.path.exists(path):
                os.remove(path)
        self._exports.clear()

    def shutdown(self) -> None:
        """Stop the worker and remove the temporary files (module cleanup, scene close)."""
        if self.job is not None and not self.job.finished:
            self.job.cancel()
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
        shutil.rmtree(self.temp_root, ignore_errors=True)

    def describe_worker(self) -> list[str]:
        if self.worker is None:
            return ["worker: not started"]
        if self.worker.ready:
            return [f"worker pid {self.worker.ready.get('pid')}: {self.worker.ready.get('models')}"]
        return ["worker: loading models" if self.worker.alive else f"worker: {self.worker.death_message()}"]


def _form_value(value):
    """A run option as MONAI Label clients send it: strings ("auto" for automatic, "x,y,z" for a point)."""
    if value is None:
        return "auto"
    if isinstance(value, (list, tuple)):
        return ",".join(f"{float(v):.9g}" for v in value)
    return value
