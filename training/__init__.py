"""Training node policies with GRPO from stored trajectories.

``grpo`` (advantages, clipped loss), ``rewards`` (outcome, format, composite, complexity
penalty, R3 stage rewards), ``groups`` (decision groups read from the store), ``trainer``
(GRPOConfig, GRPOTrainer), ``collect`` / ``loop`` (recorded ShapeWorld rollouts and on-policy
iterations), ``evaluate`` (router reports and head-to-head comparisons). Import the submodule
you need; this package imports nothing (``grpo``, ``trainer`` and ``loop`` import torch).
"""
