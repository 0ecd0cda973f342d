"""Does Stage II SFT teach? SmolLM2 before and after SFT on synthesized STEER-SFT.

Synthesizes a STEER-SFT set offline (`steerkit.smoke_inputs.offline_sft_data`: the ``rules`` roles), trains the
embedded SmolLM2-135M-Instruct with LoRA (`steerkit.sft.run_sft`), and measures on data it never saw:

- held-out loss: the RL split (no user text shared with SFT), eval loss on assistant tokens;
- refusal share on held-out harmful first turns: StrongREJECT prompts not drawn as synthesis seeds,
  under the evaluation system prompt, greedy, `steerkit.heuristics.is_refusal` on the answer;
- over-refusal on held-out benign requests (PyRIT's benign objectives and templated tasks with another
  seed, none of them a synthesis seed);
- refusal share on held-out escalations: each harmful RL-split dialogue up to its last user turn.

Prints before/after and writes the figures as JSON with ``--json``. With the defaults it takes about 10 minutes
on an idle 2-core CPU (25 on a busy one; ``OMP_NUM_THREADS=1`` helps when other jobs share the cores).

    python benchmarks/sft_learning.py [--steps 48] [--prompts 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path


def held_out_prompts(data_dir: Path, n: int) -> tuple[list[str], list[str]]:
    """(harmful, benign) prompt texts that were not synthesis seeds of ``data_dir``."""
    from steerkit.synth.seeds import (
        load_pyrit_benign,
        load_strongreject,
        stable_order,
        templated_benign,
    )

    used = {json.loads(line)["text"] for line in (data_dir / "seeds.jsonl").read_text().splitlines() if line.strip()}
    harmful = {s.id: s.text for s in load_strongreject() if s.text not in used}
    benign = {s.id: s.text for s in [*load_pyrit_benign(), *templated_benign(2 * n, seed=101)] if s.text not in used}
    return ([harmful[i] for i in stable_order(list(harmful), 1)[:n]],
            [benign[i] for i in stable_order(list(benign), 1)[:n]])


def student_requests(texts: list[str], max_tokens: int) -> list:
    from steerkit.clients import Request, Sampling
    from steerkit.converse import student_system_prompt
    from steerkit.schema import Message

    system = Message(role="system", content=student_system_prompt())
    return [Request([system, Message(role="user", content=t)], sampling=Sampling(max_tokens=max_tokens)) for t in texts]


def escalation_requests(data_dir: Path, max_tokens: int) -> list:
    """Held-out escalations: each harmful RL-split dialogue up to its last user turn (the history keeps the
    data's own assistant turns), under the evaluation system prompt."""
    from steerkit.clients import Request, Sampling
    from steerkit.converse import student_system_prompt
    from steerkit.layout import RL_FILE
    from steerkit.sft_data import load_captions, read_dialogues, with_system

    path = data_dir / RL_FILE
    captions, _ = load_captions(None, path)
    return [Request(with_system(d, student_system_prompt())[:-1], sampling=Sampling(max_tokens=max_tokens),
                    root=path.parent, captions={**d.meta.get("captions", {}), **captions})
            for _, d in read_dialogues(path) if d.kind != "benign"]


def refusal_share(texts: list[str]) -> float:
    from steerkit.heuristics import answer_or_text, is_refusal

    return sum(is_refusal(answer_or_text(t)) for t in texts) / max(len(texts), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=48, help="LoRA optimizer steps (global batch 4)")
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (constant)")
    ap.add_argument("--prompts", type=int, default=24, help="held-out harmful and benign prompts each")
    ap.add_argument("--max-tokens", type=int, default=96, help="answer length (the <thinking> part comes first)")
    ap.add_argument("--n-seeds", type=int, default=40, help="benign and harmful synthesis seeds each")
    ap.add_argument("--runs-root", type=Path, default=None, help="where the runs go (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from steerkit.layout import RL_FILE
    from steerkit.sft import SFTRecipe, run_sft
    from steerkit.sft_data import answers
    from steerkit.smoke_inputs import offline_sft_data

    root = args.runs_root or Path(tempfile.mkdtemp(prefix="sft-learning-"))
    t0 = time.perf_counter()
    data = offline_sft_data(root, run_id="data", n_benign=args.n_seeds, n_harmful=args.n_seeds)
    harmful, benign = held_out_prompts(data, args.prompts)
    escalations = escalation_requests(data, args.max_tokens)
    requests = student_requests(harmful + benign, args.max_tokens) + escalations
    before = answers("smollm2", requests)
    recipe = SFTRecipe(student="smollm2", data=str(data), eval_data=str(data / RL_FILE), finetune="lora",
                       learning_rate=args.lr, lr_scheduler_type="constant", max_steps=args.steps, batch_size=4,
                       per_device_batch_size=2, max_length=384, logging_steps=5, save_steps=10**6,
                       runs_root=str(root), run_id="sft")
    run_dir = run_sft(recipe)
    after = answers(run_dir / "checkpoint", requests)
    summary = json.loads((run_dir / "manifest.json").read_text())["summary"]
    k, b = len(harmful), len(harmful) + len(benign)
    figures = {
        "sft_dialogues": json.loads((run_dir / "manifest.json").read_text())["training"]["data"]["dialogues"],
        "steps": summary["global_step"],
        "heldout_loss_before": summary["eval_loss_before"], "heldout_loss_after": summary["eval_loss_after"],
        "harmful_refusal_before": refusal_share(before[:k]), "harmful_refusal_after": refusal_share(after[:k]),
        "benign_refusal_before": refusal_share(before[k:b]), "benign_refusal_after": refusal_share(after[k:b]),
        "escalation_refusal_before": refusal_share(before[b:]), "escalation_refusal_after": refusal_share(after[b:]),
        "escalations": len(escalations),
        "harmful_prompts": k, "benign_prompts": len(benign), "seconds": round(time.perf_counter() - t0, 1),
        "run_dir": str(run_dir),
    }
    print(f"SFT on {figures['sft_dialogues']} synthesized dialogues, {figures['steps']} LoRA steps, "
          f"{figures['seconds']} s")
    print(f"{'':34s}{'before':>10s}{'after':>10s}")
    print(f"{'held-out loss (RL split)':34s}{figures['heldout_loss_before']:10.3f}"
          f"{figures['heldout_loss_after']:10.3f}")
    print(f"{f'refusal, harmful (n={k})':34s}{figures['harmful_refusal_before']:10.1%}"
          f"{figures['harmful_refusal_after']:10.1%}")
    print(f"{f'refusal, benign (n={len(benign)})':34s}{figures['benign_refusal_before']:10.1%}"
          f"{figures['benign_refusal_after']:10.1%}")
    print(f"{f'refusal, escalation (n={len(escalations)})':34s}{figures['escalation_refusal_before']:10.1%}"
          f"{figures['escalation_refusal_after']:10.1%}")
    for i in (0, k, b)[: 2 + bool(escalations)]:
        print(f"\n{requests[i].messages[-1].content[:100]!r}\n  before: {before[i][:160]!r}"
              f"\n  after:  {after[i][:160]!r}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
