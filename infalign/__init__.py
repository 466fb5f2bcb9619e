"""infalign: inference-aware language-model alignment (calibrate, transform, KL-regularised RL)."""

__version__ = "0.1.0"
