"""Stage I and II: turn single-turn seeds into STEER-style multi-turn data (SPEC 2, 3, 5)."""
