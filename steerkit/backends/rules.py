"""The offline ``rules`` backend: keyword and template heuristics standing in for served models.

It answers a request by its ``task`` (the prompt id that built it) from the structured ``fields`` the
prompt was rendered from, and writes its reply in the same output format the real model is asked for,
so the reply goes through the same parser as a real model's. What each role's heuristic can and
cannot do is said where it lives:

- generator tasks (benign, obfuscated, forensic, rewrite, plan): `steerkit.synth.rules_generator`
  (template-driven strategies over the seed; no understanding of the request);
- red user and blue expert: `steerkit.backends.rules_red_blue` (template turns; a fixed safe-answer
  policy);
- attack judge (M4): `steerkit.backends.rules_attack_judge` (refusal, compliance and harm-cue rules
  from `steerkit.heuristics`);
- judge and evaluator: `steerkit.backends.rules_judge` (refusal, format and harm-cue rules from
  `steerkit.heuristics`);
- tutor: `steerkit.backends.rules_tutor` (the tutor rubric of docs/method.md section 4 applied to
  the same rules).
"""

from __future__ import annotations

from steerkit.clients import Reply, Request


def rules_reply(request: Request) -> str:
    name = request.task.partition("@")[0]
    match name:
        case "benign" | "obfuscated" | "forensic" | "rewrite" | "plan":
            from steerkit.synth.rules_generator import rules_generate

            return rules_generate(request)
        case "red_user":
            from steerkit.backends.rules_red_blue import rules_red_user

            return rules_red_user(request)
        case "blue_expert":
            from steerkit.backends.rules_red_blue import rules_blue_expert

            return rules_blue_expert(request)
        case "attack_judge":
            from steerkit.backends.rules_attack_judge import rules_attack_judge

            return rules_attack_judge(request)
        case "judge" | "evaluator":
            from steerkit.backends.rules_judge import rules_judge

            return rules_judge(request)
        case "tutor":
            from steerkit.backends.rules_tutor import rules_tutor

            return rules_tutor(request)
        case _:
            raise ValueError(
                f"the rules backend has no heuristic for task {request.task!r}; bind a model to this role"
            )


class RulesBackend:
    """Offline heuristics behind the ChatClient front (cheap: no concurrency limit needed)."""

    model = "rules"
    batched = False
    max_concurrency = 256

    async def generate(self, requests: list[Request]) -> list[Reply]:
        return [Reply(text=rules_reply(r), model=self.model) for r in requests]

    async def aclose(self) -> None:
        return None
