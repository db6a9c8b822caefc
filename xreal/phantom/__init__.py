"""Phantoms: synthetic chest radiographs drawn from geometry, with exact anatomy and pathology masks.

It owns the renderer (``renderer``: phantom images, their label maps and
pathology masks, the phantom pathologies), the measures of an anatomy label map
(``anatomy``: lung and heart areas, cardiothoracic ratio) and the built-in
anatomy templates a manifest may name, ``phantom-<n>`` (``templates``). Phantoms
train and test the demo model and the phantom judges without patient data. It
may import only ``xreal.core``; manifests, data, judges and the model build on it.
"""
