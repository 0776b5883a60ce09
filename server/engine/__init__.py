"""The engine: requests in, token deltas out. `LLMEngine.step()` schedules a batch over the paged KV cache, has
the worker run it and turns the samples into text; `AsyncEngine` runs the steps on a thread of its own behind an
asyncio API, the one door the HTTP layer uses."""
