"""Deduplication and the STEER-style splits: SFT, RL and Bench (method.md 2, 4 and 5), with a card.

Files a Stage I run directory holds (JSONL, readable with ``datasets.load_dataset("json", ...)``):

- ``steer_sft.jsonl``: STEER-SFT, `Dialogue` records kept by the Stage II filter;
- ``steer_rl.jsonl``: STEER-RL, `Dialogue` records of history-dependent risk (`rises`), none of
  which share user texts with STEER-SFT; GRPO reads them with `steerkit.schema.to_trl_prompt_row`
  (system + first user turn as prompt, later user turns as static candidates);
- ``steer_bench.jsonl``: STEER-Bench style `BenchItem` records (static user turns, image, category,
  subset in ``source_category``, per-turn risk trajectory on 1..5);
- ``captions.json``: image ref -> caption (M1 reports), for text-only students;
- ``README.md``: the dataset card (counts, fields, provenance, licences).

How a script lands in a split: after deduplication (MD5 of the concatenated user texts, as the
authors did), a ``bench_share`` of the scripts (fixed by the id hash) is held out for the bench and
never rolled out; the rest go through Stage II. Of the kept dialogues, those whose risk rises across
turns (`rises`) with at least ``rl_min_turns`` turns are RL candidates, and an ``rl_share`` of them
(by id hash) goes to RL, the rest to SFT. method.md 8 notes that the paper does not say how its
history-dependent RL cases were chosen; this rule and both shares are parameters.

Bench subsets (method.md 5 names five; the project's own data cannot come from their source benchmarks,
so each is assigned by the closest analogue, `bench_subset`):

=========================================  ===========  ==========================================
script                                     subset       why
=========================================  ===========  ==========================================
red-team (M1-M4 strategies)                STEER-DyS    strategy-driven dynamic scenarios
benign                                     STEER-SPA    SPA-VL mixes helpful, benign requests in
obfuscated, StrongREJECT seed              STEER-Beaver harm categories like BeaverTails-V's
obfuscated, no image                       STEER-MMSafe MM-SafetyBench has items without image
obfuscated, other seed with an image       STEER-VLS    VLSBench: image and text together
=========================================  ===========  ==========================================
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any

from steerkit.layout import BENCH_FILE, CAPTIONS_FILE, RL_FILE, SFT_FILE
from steerkit.schema import BenchItem, Dialogue, Message, Script
from steerkit.synth.seeds import stable_order
from steerkit.synth.steer_bench import load_steer_bench  # noqa: F401  (the published format's reader)

log = logging.getLogger(__name__)

SUBSETS = ("STEER-Beaver", "STEER-MMSafe", "STEER-VLS", "STEER-SPA", "STEER-DyS")  # method.md 5


def user_text_hash(texts: list[str]) -> str:
    """MD5 of the concatenated user texts (method.md 2: the authors deduplicate with MD5).

    Example:
        >>> user_text_hash(["a", "b"]) == user_text_hash(["a", "b"]) != user_text_hash(["ab"])
        True
    """
    return hashlib.md5("\n".join(t.strip() for t in texts).encode()).hexdigest()


def dedup(scripts: list[Script]) -> tuple[list[Script], list[dict[str, Any]]]:
    """Scripts with distinct user texts (first one wins) and the duplicates with what they repeat."""
    seen: dict[str, str] = {}
    keep, dups = [], []
    for s in scripts:
        h = user_text_hash(s.user_turns)
        if h in seen:
            dups.append({"id": s.id, "kind": s.kind, "reason": f"duplicate of {seen[h]} (md5 {h})"})
            continue
        seen[h] = s.id
        keep.append(s)
    return keep, dups


def rises(curve: list[int] | list[float]) -> bool:
    """History-dependent risk: the last turn is the riskiest and riskier than the first.

    Example:
        >>> rises([1, 2, 4, 5]), rises([1, 1]), rises([3, 5, 2]), rises([5])
        (True, False, False, False)
    """
    return len(curve) >= 2 and curve[-1] > curve[0] and curve[-1] == max(curve)


def bench_subset(kind: str | None, source: str | None, has_image: bool) -> str:
    """The STEER-Bench style subset of a script (table in the module docstring).

    Example:
        >>> bench_subset("redteam", "advbench", True), bench_subset("obfuscated", "strongreject", False)
        ('STEER-DyS', 'STEER-Beaver')
        >>> bench_subset("obfuscated", "advbench", False), bench_subset("obfuscated", "advbench", True)
        ('STEER-MMSafe', 'STEER-VLS')
    """
    match kind, source, has_image:
        case "redteam", _, _:
            return "STEER-DyS"
        case "benign", _, _:
            return "STEER-SPA"
        case _, "strongreject", _:
            return "STEER-Beaver"
        case _, _, False:
            return "STEER-MMSafe"
        case _:
            return "STEER-VLS"


def hold_out(scripts: list[Script], share: float, *, seed: int) -> tuple[list[Script], list[Script]]:
    """(train, bench): a ``share`` of the scripts, chosen by id hash, per kind so every kind is in both."""
    bench_ids: set[str] = set()
    for kind in sorted({s.kind for s in scripts}):
        ids = [s.id for s in scripts if s.kind == kind]
        bench_ids |= set(stable_order(ids, seed)[: round(share * len(ids))])
    return [s for s in scripts if s.id not in bench_ids], [s for s in scripts if s.id in bench_ids]


def split_rl(dialogues: list[Dialogue], *, share: float, min_turns: int,
             seed: int) -> tuple[list[Dialogue], list[Dialogue]]:
    """(sft, rl): RL takes an ``share`` of the dialogues of rising risk; no RL dialogue shares user
    texts (nor the template's) with an SFT one."""
    cand = [d.id for d in dialogues
            if rises(d.meta.get("risk_trajectory") or []) and len(d.user_texts) >= min_turns]
    rl_ids = set(stable_order(cand, seed)[: round(share * len(cand))])
    sft = [d for d in dialogues if d.id not in rl_ids]
    sft_hashes = {user_text_hash(d.user_texts) for d in sft} | {
        user_text_hash(d.meta.get("template_turns") or []) for d in sft}
    rl = []
    for d in dialogues:
        if d.id in rl_ids:
            hs = {user_text_hash(d.user_texts), user_text_hash(d.meta.get("template_turns") or [])}
            if hs & sft_hashes:
                log.info("%s: left out of RL, its user texts are in SFT", d.id)
                continue
            rl.append(d)
    return sft, rl


def bench_item(s: Script) -> BenchItem:
    """A script as a STEER-Bench item: static user turns (image with the first), subset, risk."""
    image = s.images[0] if s.images else None
    msgs = [Message(role="user", content=t, images=[image] if (i == 0 and image) else [])
            for i, t in enumerate(s.user_turns)]
    return BenchItem(question_id=s.id, messages_fixed=msgs, image=image, category=s.category,
                     source_category=bench_subset(s.kind, s.meta.get("source"), image is not None),
                     risk_trajectory=[float(r) for r in s.risk_curve])


def dataset_card(counts: dict[str, Any], *, run_id: str, provenance: dict[str, Any]) -> str:
    """The README.md of a Stage I run: a Hugging Face data-set card with one config per split."""
    lic = provenance.get("licenses", {})
    lines = [
        "---",
        "configs:",
        "- config_name: sft",
        f"  data_files: {SFT_FILE}",
        "- config_name: rl",
        f"  data_files: {RL_FILE}",
        "- config_name: bench",
        f"  data_files: {BENCH_FILE}",
        "---",
        f"# STEER-style data, run `{run_id}`",
        "",
        "Synthesised by steerkit Stage I (intent decomposition and reconstruction) and Stage II (red-blue",
        "bootstrapping with an evaluator filter), after the SaFeR-Steer method (arXiv 2604.16358).",
        "Load a split with `datasets.load_dataset(\"json\", data_files=\"steer_sft.jsonl\")` or",
        "`steerkit.schema.load_jsonl(Dialogue, ...)` / `load_jsonl(BenchItem, ...)`.",
        "",
        "## Counts",
        "",
        "| split | records | turns (mean) |",
        "|---|---|---|",
    ]
    for name in ("sft", "rl", "bench"):
        c = counts.get(name, {})
        lines.append(f"| {name} | {c.get('records', 0)} | {c.get('mean_turns', 0):.2f} |")
    lines += ["", "By kind and strategy:", ""]
    for name in ("sft", "rl", "bench"):
        lines.append(f"- {name}: kinds {counts.get(name, {}).get('by_kind', {})}; "
                     f"strategies {counts.get(name, {}).get('by_strategy', {})}")
    lines += [
        "",
        "## Fields",
        "",
        f"- `{SFT_FILE}`, `{RL_FILE}`: `id`, `messages` (role, content, images), `images`, `kind`",
        "  (benign / obfuscated / redteam), `strategy`, `verdicts` (evaluator scores per turn: harmlessness",
        "  -3..3, helpfulness 0..3, `extra.turn`), `meta` (seed id and source, licence, category,",
        "  `risk_trajectory` 1..5, template turns, generator and agent models, prompt versions, perturbation).",
        f"- `{BENCH_FILE}`: `question_id`, `messages_fixed` (static user turns; the image goes with the",
        "  first), `image`, `category`, `source_category` (STEER-Beaver / MMSafe / VLS / SPA / DyS style",
        "  subset), `risk_trajectory` (1..5 per turn).",
        f"- `{CAPTIONS_FILE}`: image ref -> caption (forensic report), for text-only models.",
        "- Image refs are relative to this folder (`images/`).",
        "",
        "## Provenance and licences",
        "",
        f"- Roles: {provenance.get('roles', {})}",
        f"- Prompts: {', '.join(provenance.get('prompts', []))}",
        f"- Seed sources and licences: {lic}",
        f"- Images: {provenance.get('images', {})}",
        "- Harmful seeds are red-teaming prompts; the assistant turns in SFT are refusals or safe help",
        "  written by the blue expert and kept only when the evaluator scored every turn safe.",
        "",
    ]
    return "\n".join(lines)


def split_counts(records: list[Dialogue] | list[BenchItem]) -> dict[str, Any]:
    """Records, mean turns, by kind and by strategy (bench: by subset)."""
    if not records:
        return {"records": 0, "mean_turns": 0.0, "by_kind": {}, "by_strategy": {}}
    if isinstance(records[0], BenchItem):
        turns = [len(b.messages_fixed) for b in records]  # type: ignore[union-attr]
        return {"records": len(records), "mean_turns": sum(turns) / len(turns),
                "by_kind": dict(Counter(b.source_category for b in records)),  # type: ignore[union-attr]
                "by_strategy": {}}
    turns = [len(d.user_texts) for d in records]  # type: ignore[union-attr]
    return {"records": len(records), "mean_turns": sum(turns) / len(turns),
            "by_kind": dict(Counter(d.kind for d in records)),  # type: ignore[union-attr]
            "by_strategy": dict(Counter(d.strategy for d in records))}  # type: ignore[union-attr]
