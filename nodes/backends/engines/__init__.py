"""In-process model engines (transformers, diffusers, the traced flow sampler) with dynamic
batching, and the tiny random-weight model builders. torch loads here, never on import of
the protocols."""
