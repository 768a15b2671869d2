"""Flow-matching sampling with log-probabilities (Flow-GRPO) for diffusers pipelines.

- :mod:`.sde` — the math of one denoising step: the deterministic (ODE) Euler step and the
  Flow-GRPO SDE step with its Gaussian log-probability (pure torch functions);
- :mod:`.transitions` — what a traced sample records (torch-free: tensors as safetensors bytes);
- :mod:`.sampler` — a sampler built from a pipeline's components (text encoders, transformer,
  VAE, scheduler sigmas) that returns an image and its stochastic transitions, and recomputes a
  stored transition's log-prob under the current weights (what training needs);

The image generator / editor for the graph whose draws are traced is
:class:`nodes.backends.engines.flow_image.FlowImageModel`. torch and diffusers are imported by
``sde`` and ``sampler`` only.
"""
