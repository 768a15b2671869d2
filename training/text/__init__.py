"""Text and vision-language node policies (plan, reflect, decompose): a peft LoRA adapter on
the LM or VLM a node calls, trained from what the store recorded — GRPO on the completions a
served model sampled (token ids, log-probs, the prompt and images the server saw), or SFT on a
run's chosen outputs with SAIR's selective masking.

``config`` (``LoRAConfig``: every hyperparameter, torch-free), ``rewards``
(``store_text_rewards``: R3's stage rewards, R_s, SAIR's composite and penalty, stored;
``node_reward``; ``score_run``/``target_fraction`` for ``collect``'s one-step runs), ``groups``
(``read_node_groups``: a node's completions for the same input in graph runs; ``read_groups``
for ``collect``'s runs), ``trainer`` (``LoRATrainer``: LMs, LLaVA, Qwen2-VL; fp32/bf16),
``sft`` (``read_sft_examples``, ``train_sft``), ``sampling`` (``collect``) and ``loop``
(``grpo_round``). This package imports nothing; ``trainer``, ``sft``'s training and ``loop``
import torch, transformers and peft.
"""
