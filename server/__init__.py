"""detserve's HTTP edge: an OpenAI-compatible API over the engine, and the `detserve` command."""
