"""In-process model engines (transformers, diffusers, the traced flow sampler), each served to
concurrent callers in dynamic batches by one :class:`~.service.ModelService`, and the tiny
random-weight model builders. torch loads here, never on import of the protocols."""
