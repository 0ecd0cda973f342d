"""steerkit: a workbench for multi-turn safety alignment of vision-language chat models.

It implements SaFeR-Steer (Stage I synthesis, Stage II SFT, Stage III tutor-in-the-loop GRPO with
TCSR, and multi-turn evaluation). Heavy libraries are imported inside the modules that need them, so
``import steerkit`` is instant.
"""

__version__ = "0.1.0"
