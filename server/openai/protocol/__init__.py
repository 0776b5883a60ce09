"""The OpenAI API's request and response bodies, field by field, as pydantic models: the wire format and its
validation, nothing more. Requests are validated strictly (a string is not a number); fields this server does not
know are ignored, as OpenAI-compatible servers commonly do. Turning a request into a prompt, a grammar and
sampling parameters is the serving layer's (server/openai/serving/)."""
