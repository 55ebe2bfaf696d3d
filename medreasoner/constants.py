"""One home for every constant more than one module (or a front end) needs."""

from __future__ import annotations

# -- models -----------------------------------------------------------------------------------------
DEFAULT_CRM = "zzzyzh/MedReasoner-Soft-7B"
DEFAULT_ASM = "litemedsam"  # the only real medical weights available offline
# U-MRG images are 840x840 and the released CRM was trained on them (840 = 30 * 28, so the Qwen
# processor keeps it as is).
DEFAULT_CRM_IMAGE_SIZE = 840
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_OPENAI_BASE_URL = "http://127.0.0.1:8000/v1"
# Written next to CRM weights by `make-tiny`, training and export: tiny-model marker and image size.
CRM_SIDECAR = "medreasoner_crm.json"

TINY_WARNING = ("TINY TEST MODEL OUTPUT: made with random/format-only test weights; "
                "the box, points, reasoning and mask have no medical meaning.")

# -- files ------------------------------------------------------------------------------------------
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom",
                  ".ima", ".npy")
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")

# -- results ----------------------------------------------------------------------------------------
RESULT_SCHEMA_VERSION = "1.0"


class Status:
    """What happened to one case; every result record's ``status`` is one of these."""

    OK = "ok"  # a mask was produced
    NO_TARGET = "no_target"  # the CRM gave no usable box: the mask is empty, ``message`` says why
    ERROR = "error"  # the case's input could not be used (batch runs only; single runs raise)


# -- exit codes (CLI, MONAI bundle, worker) ---------------------------------------------------------
EXIT_OK = 0
EXIT_INPUT = 2  # bad input or options
EXIT_MODEL = 3  # a model could not be loaded
EXIT_NO_TARGET = 4  # the CRM found no target for at least one case (empty mask + reason written)
EXIT_CANCELLED = 130  # interrupted / cancelled; nothing partial written

EXIT_FOR_STATUS = {Status.OK: EXIT_OK, Status.NO_TARGET: EXIT_NO_TARGET, Status.ERROR: EXIT_INPUT}


def exit_code_for(statuses) -> int:
    """0 when every case is ok; 2 if any case had bad input; else 4 if any found no target."""
    codes = {EXIT_FOR_STATUS.get(s, EXIT_INPUT) for s in statuses}
    return EXIT_INPUT if EXIT_INPUT in codes else (EXIT_NO_TARGET if EXIT_NO_TARGET in codes else EXIT_OK)

# Largest volume read: 2^30 voxels (1024^3; a 512x512x4096 CT). A header may declare any size, and the
# reader allocates it before it finds out the file is short (a 480-byte NIfTI claiming 512x512x30000
# took 15 GB); a real volume above this is a research edge case to crop or resample first.
MAX_VOLUME_VOXELS = 1 << 30
