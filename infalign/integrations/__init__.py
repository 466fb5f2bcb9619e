"""Integrations with third-party trainers. Each submodule imports its framework lazily.

- ``infalign.integrations.calibrated``: ``CalibratedReward``, the calibrated + transformed reward
  ``Phi(C_hat(x, y))`` of one completion, shared by everything below.
- ``infalign.integrations.trl``: ``CalibratedReward`` as a TRL reward function,
  ``add_reference_rewards`` for the dataset column it reads, and ``exact_ctrl_config`` for the
  ``RLOOConfig`` that keeps TRL's objective exactly CTRL's (docs/trl.md).
- ``infalign.integrations.recipe_reward``: a recipe's CTRL reward (reward model + train reference
  artifact + the method's transform) loaded once, keyed by prompt text.
- ``infalign.integrations.reward_server``: ``infalign serve-reward``, OpenRLHF's remote reward
  protocol on FastAPI + uvicorn (docs/openrlhf.md).
- ``infalign.integrations.openrlhf`` / ``.verl``: OpenRLHF's ``reward_func`` and verl's
  ``compute_score`` (per sample and batch), written into a file by ``infalign export-reward``
  (docs/openrlhf.md, docs/verl.md).
- ``infalign.integrations.commands``: the two CLI verbs.
"""
