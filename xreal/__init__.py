"""xreal: a synthetic chest X-ray dataset factory built on XReal.

One subpackage per subsystem; imports point one way, from the bottom of this
list to the top, never in a circle (``tests/test_layers.py`` checks it):

- ``xreal.core``: shared basics (labels, masks, images, files, errors, settings, the records that pin
  bundles and judge sets, the weight cache);
- ``xreal.phantom``: phantoms drawn from geometry, their anatomy templates and measures;
- ``xreal.data``: real data in (DICOM, MIMIC-CXR, VinDr-CXR, CheXpert, NIH, CheXmask) and the training sets they become;
- ``xreal.manifest``: what a dataset must contain: schema and validation, spec builder, audit,
  manifests from training sets;
- ``xreal.judges``: the quality judges that score generated images;
- ``xreal.model``: the XReal model, its bundles, sampler, training and reference import;
- ``xreal.run``: a run from a manifest to a dataset: configuration, generation, policy, the dataset
  writer, audit, verify;
- ``xreal.cli``: the ``xreal`` command line, on top of the library and ``flows/``.

Two modules stay at this level. ``xreal.text`` holds the text encoder: model
bundles name it by that path in ``model_index.json``, so the path is part of the
bundle format; it belongs to the model layer. ``xreal.dataset`` is the old path of
:mod:`xreal.run.dataset`, kept for one release with a DeprecationWarning (dataset
cards show ``from xreal.dataset import XRealDataset``).
"""
