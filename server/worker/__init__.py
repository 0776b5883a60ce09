"""The worker: the model, its KV cache and the sampler on one device. `ModelRunner.execute` turns a scheduled
batch into one forward pass (decode rows through a prepared decode step) and one token per sampled row."""

# The name of the thread a runner compiles its decode step on (server/__main__.py ends the process at once if one
# is still running at exit).
COMPILE_THREAD = "compile-decode"
