"""Ray Serve deployment of registered models (see app.py). Importing this package does not import Ray.

    from modelworks.serve import deploy
    deploy("digits@production", serve_config=cfg.serve)        # a workflow's last step
"""
from __future__ import annotations


def deploy(model: str, **kwargs):
    """Start (or update) the Serve application for ``model``; see ``modelworks.serve.runner.start``."""
    from modelworks.serve.runner import start

    return start(model, **kwargs)


def deploy_workflow_model(cfg, model_ref: str, **kwargs):
    """Deploy a workflow's registered model with the workflow's ``serve`` section."""
    from modelworks.serve.runner import start

    return start(model_ref, serve_config=cfg.serve, **kwargs)


__all__ = ["deploy", "deploy_workflow_model"]
