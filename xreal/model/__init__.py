"""The XReal model: anatomy- and pathology-controlled latent diffusion.

It owns the components and their size presets, model bundles on disk and their
model cards (``bundle``: ``load_pipeline``, ``save_bundle``), the sampling pipeline
``XRealPipeline`` (``sampling``), training the autoencoder, anatomy controller,
backbone and demo bundle (``training``), importing the reference checkpoints
(``reference``) and the reference's sampler (``reference_sampler``). Its text
encoder is ``xreal.text``, at the top level because bundles name that path. It may
import ``xreal.core``, ``xreal.data`` (training sets) and ``xreal.judges`` (model
cards); the run and the command line load models through it.
"""
