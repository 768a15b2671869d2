"""HTTP clients of model servers (vLLM, vLLM-Omni, Atelier's own): the retrying, load-balanced
pool and the OpenAI-chat and image-API clients built on it."""
