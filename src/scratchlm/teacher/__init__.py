"""Teachers: batched text generation from a local model or an OpenAI-compatible server."""
