"""Backends behind `steerkit.clients.ChatClient`: each only generates and classifies its errors.

- `openai_compat`: any OpenAI-compatible HTTP server (vLLM, SGLang, hosted APIs).
- `hf_local`: an in-process transformers model, batched generation with its chat template.
- `rules`: offline heuristics for the generator, user agents, tutor, judge and evaluator roles.
- `scripted`: deterministic doubles for tests.
"""
