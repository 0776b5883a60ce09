"""One module per endpoint: a request's preparation (prompt, grammar, sampling parameters), its run through the
engine, and its answer as a full response or a stream of server-sent events."""
