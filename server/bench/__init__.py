"""A load-test client for any OpenAI-compatible server; it imports nothing else of `server/`, nor torch."""
