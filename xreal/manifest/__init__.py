"""Manifests: what a dataset must contain, one row per request (labels, anatomy, pathology masks, count, seed).

It owns the manifest's schema, validation, requests and expansion into samples
(``schema``), building a manifest from a YAML/JSON spec (``spec``), auditing what
a manifest asks for (``audit``), manifests drawn from a training set's index
(``from_index``) and the radiologists' boxes and masks torchxrayvision ships,
used to place pathologies (``annotations``). It may import ``xreal.core``,
``xreal.phantom`` (built-in anatomy templates) and ``xreal.data`` (the training
index, the sources' label mappings); the run reads manifests.
"""
