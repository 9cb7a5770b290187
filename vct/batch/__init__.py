"""The batch engine: plan a manifest, run its stage jobs, apply the resume rules, write outputs
and report, return one typed summary. See :mod:`vct.batch.engine` for the steps.

Layers: ``keys`` (every cache key), ``settings`` (the typed run settings), ``plan`` (rows to
jobs), ``jobs`` (a job's body), ``workers`` (where jobs run: in process or accelerate ranks),
``outputs`` (file names, resume rule, writing a pair), ``summary`` (statuses and counts). The
library never imports Prefect: ``flows/`` wraps the engine's steps in tasks.
"""
