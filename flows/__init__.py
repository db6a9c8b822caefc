"""Prefect flows and tasks for xreal.

Flows decide order, fan-out, retries, caching and reporting; each task is a
thin wrapper over one function of the ``xreal`` library. The generation flow
lands here with the generation-run work.
"""
