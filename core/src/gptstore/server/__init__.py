"""The HTTP service: OpenAI-compatible endpoints and the store API, on Litestar."""

from gptstore.server.app import create_app

__all__ = ["create_app"]
