"""Text policies: a peft LoRA adapter on a chat model (the planner), trained with GRPO on the
completions a served model sampled, from the token ids and log-probs the store recorded.

``sampling`` (``collect``: completions from a chat server, recorded), ``rewards``
(``score_run``: a reward of each completion, into the store; ``target_fraction``), ``groups``
(``read_groups``: text groups of ``collect``'s runs; ``read_node_groups``: a node's
completions for the same input in graph runs), ``trainer`` (``LoRAConfig``, ``LoRATrainer``),
``loop`` (``grpo_round``: one on-policy round). This package imports nothing; ``trainer`` and
``loop`` import torch, transformers and peft.
"""
