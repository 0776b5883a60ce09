"""The OpenAI-compatible HTTP layer: FastAPI app and routes, the wire format (protocol models), one serving
module per endpoint, errors, auth, limits and metrics. It reaches the engine only through `AsyncEngine`."""
