"""Decision policies (the router's mode, the stop policy's stop/continue): small torch models
trained with GRPO on the decisions ShapeWorld (or any graph) rollouts record.

``sampling`` (``collect``: recorded rollouts with the policies being trained), ``groups``
(``read_groups``: decision groups from the store; the rewards are the judge's score the
rollout stored, the format reward and any stored trajectory reward), ``trainer``
(``GRPOConfig``, ``GRPOTrainer``), ``loop`` (on-policy iterations). This package imports
nothing; ``trainer`` and ``loop`` import torch.
"""
