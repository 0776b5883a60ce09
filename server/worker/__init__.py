"""The worker: the model, its KV cache and the sampler on one device. `ModelRunner.execute` turns a scheduled
batch into one forward pass (decode rows through a prepared decode step) and one token per sampled row."""
