"""Image policies: a LoRA on a flow-matching diffusion model (SD3, Flux), trained with Flow-GRPO
on the denoising transitions the draw (or refine) node recorded.

``sampling`` (``collect``: graph rollouts that draw the prompts, recorded with their
transitions), ``rewards`` (``score_run``: a reward of each final image, into the store),
``groups`` (``read_groups``: image groups from the store, with a step's own reward winning over
the trajectory's), ``trainer`` (``FlowGRPOConfig``, ``FlowGRPOTrainer``). The loop, end to end
(``tests/test_flow_training.py`` runs it on a tiny random-weight SD3)::

    trainer = FlowGRPOTrainer(pipe, model="sd3")                     # base + trainable LoRA
    painter = FlowImageModel(FlowImageEngine(trainer.pipe, name="sd3"))  # samples with the LoRA
    run_id = await collect(painter, store, prompts, group_size=8)    # graph → store
    score_run(store, run_id, redness, "redness")                     # rewards, into the store
    groups = read_groups(store, run_id, reward="redness")            # read back
    result = trainer.train(groups)                                   # ratio, clip, KL, AdamW
    save_version(trainer, store, "draw-1", result.metrics)           # peft layout, registered

This package imports nothing; ``trainer`` imports torch (and diffusers and peft when built).
"""
