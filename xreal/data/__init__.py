"""Real data in: reading radiographs and their labels, and turning them into training sets.

It owns DICOM reading and writing (``dicom``), the indexes of MIMIC-CXR
(``mimic``), VinDr-CXR (``vindr``), CheXpert (``chexpert``) and NIH ChestX-ray14
(``nih``), the CheXmask anatomy masks (``chexmask``), writing a training set from
an index (``ingest``) and the training set's index format, phantom training sets
included (``training_index``). It may import ``xreal.core`` and ``xreal.phantom``
(a phantom training set is rendered here); manifests, the model and the run
read what it writes.
"""
