"""The inference engine and the OpenAI-compatible HTTP server."""

__version__ = "0.1.0"
