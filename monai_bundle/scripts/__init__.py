"""Bundle-side adapter code for the MedReasoner MONAI bundle.

Everything that reads images, windows intensities, handles orientation or segments lives in the
``medreasoner`` package; this folder only turns bundle config values into calls to it.
"""
