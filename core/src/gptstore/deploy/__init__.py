"""The deployment layer: versions of a deployment, their replica processes, routing between
them, and health (see docs/architecture.md). :mod:`gptstore.serving` is what runs inside a
replica; :mod:`gptstore.server` is the HTTP layer that calls this one."""

from gptstore.deploy.manager import Deployments, Served

__all__ = ["Deployments", "Served"]
