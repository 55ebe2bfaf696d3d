"""Import fix for a CUDA-built torchvision wheel next to a CPU-only torch.

Installed into site-packages (with a one-line ``.pth``) by ``tools/install_torchvision_fix.py``
only when torchvision's C extension fails to load. torchvision registers fake kernels for
``torchvision::nms`` at import; when ``_C.so`` cannot load, that op was never defined and the
import raises. Defining the two op schemas (no kernels) first lets ``import torchvision``
succeed; ``torchvision.ops.nms`` then raises as in any build without the extension.
"""
import contextlib
import importlib.abc
import importlib.util
import os
import sys

_KEEP = []  # the torch.library handles must stay alive for the schemas to stay defined


def _define_missing_ops():
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return  # the real extension works: leave torchvision alone
                except (OSError, RuntimeError, ImportError):
                    pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        with contextlib.suppress(Exception):  # must never break the import it precedes
            _define_missing_ops()
        return None


if "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _BeforeTorchvision())
