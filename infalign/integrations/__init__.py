"""Integrations with third-party trainers. Each submodule imports its framework lazily.

- ``infalign.integrations.trl``: the calibrated + transformed reward as a TRL reward function
  (``CalibratedReward``), ``add_reference_rewards`` for the dataset column it reads, and
  ``exact_ctrl_config`` for the ``RLOOConfig`` that keeps TRL's objective exactly CTRL's.
"""
