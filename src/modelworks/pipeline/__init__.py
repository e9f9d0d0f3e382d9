"""The workflow runner: a workflow is a graph of named, cached, traceable steps. One file per job:

    graph.py        steps as data, the order from their inputs, ``@step`` for user steps (no Ray)
    cache.py        step keys (config fields, data fingerprints, upstream keys, code) and the shared cache
    manifest.py     runs/<run>/manifest.json: each step's inputs, outputs, timing, cache hit or miss
    types.py        what a built-in step receives and returns
    data_steps.py   the ingest and preprocess steps
    model_steps.py  pretrain, train, search, evaluate, register
    builtins.py     the built-in steps as data; the default graph of a config
    runner.py       runs the graph: the driver for built-ins, Ray tasks for user steps

Importing the package does not import Ray: ``from modelworks.pipeline import step`` is all a workflow file needs.
"""
from modelworks.pipeline.graph import Graph, Resources, Step, step, user_steps

__all__ = ["Graph", "Resources", "Step", "step", "user_steps"]
