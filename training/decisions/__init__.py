"""Decision policies (the router's mode, the stop policy's stop/continue): small torch models
trained with GRPO on the decisions ShapeWorld (or any graph) rollouts record.

``sampling`` (``collect``: recorded rollouts with the policies being trained), ``groups``
(``read_groups``: decision groups from the store; the rewards are the judge's score the
rollout stored, the format reward and any stored trajectory reward), ``trainer``
(``GRPOConfig``, ``GRPOTrainer``), ``loop`` (on-policy iterations), ``async_loop`` (a
sampler and a trainer at once through the store, groups at most K versions stale). This
package imports nothing; ``trainer``, ``loop`` and ``async_loop`` import torch.
"""
