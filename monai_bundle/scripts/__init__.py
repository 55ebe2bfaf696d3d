"""Bundle-side code for the MedReasoner MONAI bundle: the MONAI workflow pieces over the core.

``inference`` (config values -> the core's options and case lists), ``network`` (``network_def``),
``transforms`` (``preprocessing`` / ``postprocessing``), ``inferer`` (``inferer``, ``prepare_batch``),
``handlers`` (evaluator handlers). Everything that reads images, windows intensities, handles
orientation, segments or writes results lives in the ``medreasoner`` package.
"""
