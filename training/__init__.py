"""Training node policies with GRPO from stored trajectories.

Every policy kind is trained in the same shape, with the same names:

    collect(...)                    sampling: a recorded run of the policy being trained
    score_run(store, run_id, ...)   rewards, stored (decisions: store_member_rewards, once
                                    read_groups has computed R_o and R_f per member)
    read_groups(store, run_ids)     GRPO groups read back from the store: ``group_id``,
                                    ``prompt``, ``members`` (each with ``trajectory_id`` and its
                                    reward(s)), with what was sampled exactly as recorded
    trainer.train(groups)           -> ``TrainResult`` (version, metrics, per-step history)
    save_version(trainer, store, d) the new version saved atomically and registered in the
                                    store; a version or directory that exists is never
                                    overwritten

The kinds, one subpackage each (``sampling``, ``groups``, ``trainer``, and ``rewards`` /
``loop`` where the kind has them):

- ``decisions``: the router's mode and the stop policy's stop/continue (small torch models),
  ``GRPOTrainer``; ``decisions.loop`` runs on-policy iterations on ShapeWorld.
- ``text``: a LoRA adapter of a chat model, from the token ids and log-probs a server sampled,
  ``LoRATrainer``; ``text.loop.grpo_round`` is one on-policy round.
- ``images``: a LoRA of a flow-matching diffusion model, from the recorded denoising
  transitions, ``FlowGRPOTrainer`` (Flow-GRPO).

Shared by the kinds: ``grpo`` and ``flow_grpo`` (the math: advantages, clipped losses, KL),
``rewards`` (outcome, format, composite, complexity penalty, R3's stage rewards), ``reading``
(stored groups read in bulk), ``result`` (``TrainResult``, the ``Trainer`` protocol),
``versions`` (free version numbers, ``save_version``). Beside them: ``tree`` (R3's Tree-RL:
stage groups of decisions forked from stored states), ``evaluate`` (router reports and
head-to-head comparisons) and ``tensorboard``.

Import the module you need: this package and its subpackages import nothing; the trainers
(and the loops) import torch, and transformers, peft or diffusers where the kind needs them.
"""
