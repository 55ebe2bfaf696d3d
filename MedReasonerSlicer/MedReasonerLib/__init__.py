"""The MedReasoner Slicer module's library: one job per file, no Qt, usable without the widget.

- ``parameters``: the run settings (a Slicer parameter node), questions and their history
- ``errors``: the one error type the module shows to the user
- ``terminology``: segment names, colours and terminology entries from questions
- ``markups``: box and key points of a result record as ROI / fiducial nodes (RAS)
- ``scene``: applying results to the scene as one undoable unit
- ``worker_client``: the local worker process (``python -m medreasoner worker``)
- ``remote_client``: a MONAI Label server (standard library only)
- ``jobs``: a run in the background, polled from the GUI thread
- ``install``: dependencies of the local worker in Slicer's Python
- ``snapshot``: Slicer's slice view to a PNG
"""
