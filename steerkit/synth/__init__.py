"""Stage I and II: turn single-turn seeds into STEER-style multi-turn data (method.md 2, 3, 5).

- `seeds`: packaged, local and hub seeds and images, with provenance; bad seeds counted, not fatal;
- `asking`: render a prompt per item, ask concurrently, parse strictly, retry the failures;
- `benign`, `obfuscated`, `redteam` (M1-M4), `perturb`: the Stage I generators;
- `rules_generator`: the offline generator behind the ``rules`` role spec;
- `bootstrap`: Stage II red user / blue expert rollouts and the evaluator filter;
- `splits`: deduplication, STEER-SFT / RL / Bench files, the data-set card, the STEER-Bench loader;
- `synthesize`: the resumable end-to-end run notebook 01 calls.
"""
