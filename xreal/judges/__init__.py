"""Quality judges: the networks that score a generated image before a run keeps it.

It owns the judge set (``judging``: torchxrayvision's classifier, anatomy
segmenter and reconstruction error, sanity scores, Dice, the realism reference,
saving, loading and describing a judge set), the phantom anatomy segmenter network
(``phantom_segmenter``), the training of the phantom judge set on rendered
phantoms (``phantom_judges``) and the memorisation judge (``memorisation``: a
training set's feature bank and the nearest-training-image search). It may import
``xreal.core``, ``xreal.phantom`` and ``xreal.data`` (a bank reads a training index).
It sits below the model because a model card describes the bundle's judges;
what a run does with the scores is ``xreal.run.policy``.
"""
