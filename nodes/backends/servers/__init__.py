"""Atelier's HTTP model servers (`atelier serve lm|image`): the shared FastAPI app parts and
the language- and image-model servers over the in-process engines."""
