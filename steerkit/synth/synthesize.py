"""Stage I and II end to end: seeds -> scripts -> red-blue dialogues -> STEER-style splits.

`synthesize(run, roles, params)` is what notebook 01 calls. Every step streams its results to a
`steerkit.runs.ResultLog` in the run directory, in chunks, so a killed run started again with the
same run id does not repeat a finished seed or script:

==================  ====================  ====================================================
file                key                   what
==================  ====================  ====================================================
seeds.jsonl         (written once)        the chosen seeds (kinds assigned), images attached
forensic.jsonl      image ref             M1 reports (captions)
stage1.jsonl        seed id               benign / obfuscated scripts, red-team plans (M2+M3)
m4.jsonl            script id             red-team simulation: kept or rejected, transcript
stage2.jsonl        script id             Stage II dialogue, kept or rejected with the reason
==================  ====================  ====================================================

Then the cheap, deterministic assembly: deduplication, bench hold-out, the SFT/RL split, the split
files, ``rejected.jsonl`` (every rejected or skipped item with its reason), ``captions.json``, the
data-set card, and the summary counts in the manifest (`steerkit.synth.splits` names the files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steerkit import layout
from steerkit.parameters import named_fields
from steerkit.progress import Progress
from steerkit.roles import Roles
from steerkit.runs import Run, atomic_write_json, atomic_write_text
from steerkit.schema import Dialogue, Script, Seed, write_jsonl
from steerkit.synth import seeds as sd
from steerkit.synth import splits as sp
from steerkit.synth.benign import BENIGN_TURNS, generate_benign
from steerkit.synth.bootstrap import TAU_HELP, TAU_SAFE, bootstrap
from steerkit.synth.obfuscated import OBFUSCATED_TURNS, generate_obfuscated
from steerkit.synth.perturb import (
    FONT_SHARE,
    NOISE_SIGMA,
    PERTURB_SHARE,
    choose_perturbed,
    perturb_image,
)
from steerkit.synth.redteam import (
    KEEP_THRESHOLD,
    TURN_BOUNDS,
    forensic_reports,
    plan_scripts,
    rewrite_intents,
    simulate,
)
from steerkit.synth.seed_files import load_seed_sets

log = logging.getLogger(__name__)

PROMPTS = ["benign@1", "obfuscated@1", "forensic@1", "rewrite@1", "plan@1", "attack_judge@1", "red_user@1",
           "blue_expert@1", "evaluator@1", "student_system@1", "redteam_pools@1"]


@dataclass
class SynthParams:
    """Every choice of a synthesis run (recorded in the manifest). Counts are seeds per kind."""

    seed: int = 0
    n_benign: int = 8
    n_obfuscated: int = 8
    n_redteam: int = 8
    harmful_sources: list[str] = field(default_factory=lambda: ["strongreject", "advbench"])
    # The researcher's own seeds (docs/data.md): JSONL/CSV files, read strictly, and hub sets as
    # "hub:<dataset>:<split>:<text column>[?options]" (or load_hub_seeds arguments).
    seed_files: list[str] = field(default_factory=list)
    hub_seeds: list[str | dict[str, Any]] = field(default_factory=list)
    pyrit_benign: bool = True
    images: list[str] = field(default_factory=lambda: [a.name for a in sd.PACKAGE_IMAGES])
    image_share: float = 0.75  # share of seeds given a packaged image (our choice)
    benign_turns: tuple[int, int] = BENIGN_TURNS
    obfuscated_turns: tuple[int, int] = OBFUSCATED_TURNS
    turn_bounds: tuple[int, int] = TURN_BOUNDS
    strategy_ranges: dict[str, tuple[int, int]] | None = None  # None: the published ranges
    with_answers: bool = True
    tries: int = 3
    perturb_share: float = PERTURB_SHARE
    noise_sigma: float = NOISE_SIGMA
    font_share: float = FONT_SHARE
    keep_threshold: int = KEEP_THRESHOLD
    target_max_tokens: int = 96
    tau_safe: float = TAU_SAFE
    tau_help: float = TAU_HELP
    bench_share: float = 0.25
    rl_share: float = 0.5
    rl_min_turns: int = 3
    chunk_size: int = 16

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> SynthParams:
        """The fields named in ``values`` (notebook 01's ``globals()``); other names are ignored.

        >>> SynthParams.from_parameters({"n_benign": 2, "generator": "rules"}).n_benign
        2
        """
        return cls(**named_fields(cls, values))

    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), max(1, n))]


def reason_kind(reason: str) -> str:
    """A rejection reason without its numbers, for counting.

    Example:
        >>> reason_kind("min harmlessness -2 < 2"), reason_kind("unscored turn(s) [1, 2]")
        ('min harmlessness', 'unscored turn(s)')
    """
    return re.split(r"\s*[-\d\[]", reason, maxsplit=1)[0].strip() or reason


def choose_seeds(run: Run, p: SynthParams) -> tuple[list[Seed], dict[str, Any], dict[str, Any]]:
    """Seeds for each kind (disjoint), images attached; written once to seeds.jsonl and reused."""
    path = run.file(layout.SEEDS_FILE)
    images = sd.copy_package_images(run.file("images"), p.images)
    image_info = {ref: {"name": a.name, "license": a.license, "source": a.source, "notes": a.description}
                  for a, ref in images.values()}
    if path.exists():
        from steerkit.schema import load_jsonl

        return load_jsonl(Seed, path, check_images=False), run.manifest.get("seed_skips", {}), image_info
    skips = sd.SkipLog()
    harmful: list[Seed] = []
    for name in p.harmful_sources:
        match name:
            case "strongreject":
                harmful += sd.load_strongreject(skips)
            case "advbench":
                harmful += sd.load_advbench(skips)
            case _:
                raise ValueError(f"harmful_sources: unknown source {name!r}; use strongreject, advbench")
    benign = sd.load_pyrit_benign(skips) if p.pyrit_benign else []
    for s in load_seed_sets(p.seed_files, p.hub_seeds, image_dir=run.file("images"), skips=skips):
        (harmful if s.harmful else benign).append(s)
    refs = [ref for _, ref in images.values()]
    benign_pool = sd.sample(benign, max(0, p.n_benign // 3), seed=p.seed)
    benign_pool += sd.templated_benign(p.n_benign - len(benign_pool), seed=p.seed,
                                       images=[a for a, _ in images.values()],
                                       image_refs={a.name: r for a, r in images.values()})
    picked = sd.sample(harmful, p.n_obfuscated + p.n_redteam, seed=p.seed)
    obf = [s.model_copy(update={"meta": {**s.meta, "kind": "obfuscated"}}) for s in picked[: p.n_obfuscated]]
    red = [s.model_copy(update={"meta": {**s.meta, "kind": "redteam"}}) for s in picked[p.n_obfuscated :]]
    ben = [s.model_copy(update={"meta": {**s.meta, "kind": "benign"}}) for s in benign_pool]
    chosen = sd.attach_images(obf + red, refs, share=p.image_share, seed=p.seed) + ben
    write_jsonl(chosen, path)
    # The researcher's seed files by content, so the manifest says exactly which data went in.
    inputs = {str(Path(f).resolve()): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in p.seed_files}
    run.update_manifest(seed_skips=skips.summary(), seed_file_sha256=inputs)
    return chosen, skips.summary(), image_info


def synthesize(run: Run, roles: Roles, params: SynthParams | None = None) -> dict[str, Any]:
    """Run Stage I and II into ``run`` (resumable) and return the summary counts (module docstring)."""
    p = params or SynthParams()
    root = run.path
    seeds, seed_skips, image_info = choose_seeds(run, p)
    kind_of = {s.id: s.meta["kind"] for s in seeds}
    by_kind = {k: [s for s in seeds if kind_of[s.id] == k] for k in ("benign", "obfuscated", "redteam")}

    # Perturb a share of the red-team images (deterministic; each seed gets its own copy).
    red_with_image = [s.id for s in by_kind["redteam"] if s.image]
    perturbed = choose_perturbed(red_with_image, share=p.perturb_share, seed=p.seed)
    perturbations: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(by_kind["redteam"]):
        if s.id in perturbed:
            dest = run.file("images") / f"{s.id}-perturbed.png"
            rec = perturb_image(root / s.image, dest, key=s.id, seed=p.seed, sigma=p.noise_sigma,  # type: ignore[operator]
                                font_share=p.font_share)
            ref = f"images/{dest.name}"
            perturbations[s.id] = {**rec, "image": ref, "source_image": s.image}
            image_info[ref] = {**image_info.get(s.image, {}), "overlay_text": rec["trigger"],  # type: ignore[arg-type]
                               "overlay_corner": rec["corner"], "perturbed_from": s.image}
            by_kind["redteam"][i] = s.model_copy(update={"image": ref})

    # M1: forensic report per image in use; captions for everyone.
    used = sorted({s.image for ss in by_kind.values() for s in ss if s.image})
    flog = run.results("forensic.jsonl")
    reports = {r["id"]: r["report"] for r in flog}
    for chunk in _chunks([r for r in used if r not in reports], p.chunk_size):
        got = forensic_reports(roles.client("generator"), {r: image_info.get(r, {}) for r in chunk},
                               tries=p.tries, root=root)
        for ref, rep in got.items():
            flog.append({"id": ref, "report": rep})
            reports[ref] = rep
    captions = {ref: reports[ref]["caption"] for ref in used}
    atomic_write_json(run.file(layout.CAPTIONS_FILE), captions)

    # Stage I: benign, obfuscated, red-team M2+M3 (one record per seed).
    s1 = run.results("stage1.jsonl")
    done = s1.done_keys()
    gen = roles.client("generator")
    todo1 = {kind: [s for s in by_kind[kind] if s.id not in done] for kind in by_kind}
    progress = Progress(run.path, "Stage I scripts", total=sum(map(len, todo1.values())), unit="seeds")
    for kind in ("benign", "obfuscated", "redteam"):
        for chunk in _chunks(todo1[kind], p.chunk_size):
            match kind:
                case "benign":
                    out = generate_benign(gen, chunk, turns=p.benign_turns, with_answers=p.with_answers,
                                          tries=p.tries, captions=captions, root=root)
                case "obfuscated":
                    out = generate_obfuscated(gen, chunk, turns=p.obfuscated_turns, tries=p.tries,
                                              captions=captions, root=root)
                case _:
                    rw = rewrite_intents(gen, chunk, captions=captions, seed=p.seed, tries=p.tries, root=root)
                    out = plan_scripts(gen, chunk, rw, captions=captions, seed=p.seed, tries=p.tries, root=root,
                                       ranges=p.strategy_ranges, bounds=p.turn_bounds, perturbations=perturbations)
            for sc in out.scripts:
                s1.append({"id": sc.seed_id, "status": "script", "kind": kind, "script": sc.model_dump()})
            for sk in out.skipped:
                s1.append({**sk, "status": "skipped"})
            progress.advance(len(chunk))
    progress.close()
    stage1 = list(s1)
    scripts = [Script.model_validate(r["script"]) for r in stage1 if r["status"] == "script"]

    # M4: simulate red-team scripts against the target; keep iff some turn scores >= threshold.
    m4 = run.results("m4.jsonl")
    m4_done = m4.done_keys()
    red = [s for s in scripts if s.kind == "redteam" and s.id not in m4_done]
    judge_role = "generator"
    progress = Progress(run.path, "M4 red-team checks", total=len(red), unit="scripts")
    for chunk in _chunks(red, p.chunk_size):
        from steerkit.clients import Sampling

        sim = simulate(roles.client("target"), roles.client(judge_role), chunk, captions=captions, root=root,
                       keep_threshold=p.keep_threshold, tries=p.tries,
                       target_sampling=Sampling(temperature=0.0, max_tokens=p.target_max_tokens))
        for s in sim.kept:
            m4.append({"id": s.id, "status": "kept", "script": s.model_dump(), "transcript": sim.transcripts[s.id]})
        for r in sim.rejected:
            m4.append({**r, "status": "rejected", "transcript": sim.transcripts[r["id"]]})
        progress.advance(len(chunk))
    progress.close()
    m4_recs = {r["id"]: r for r in m4}
    final_scripts = [s for s in scripts if s.kind != "redteam"] + [
        Script.model_validate(r["script"]) for r in m4_recs.values() if r["status"] == "kept"]

    # Deduplicate, hold out the bench, roll out the rest (Stage II).
    unique, dups = sp.dedup(final_scripts)
    train, bench = sp.hold_out(unique, p.bench_share, seed=p.seed)
    s2 = run.results("stage2.jsonl")
    s2_done = s2.done_keys()
    todo2 = [s for s in train if s.id not in s2_done]
    progress = Progress(run.path, "Stage II rollouts", total=len(todo2), unit="dialogues")
    for chunk in _chunks(todo2, p.chunk_size):
        b = bootstrap(roles.client("red_user"), roles.client("blue_expert"), roles.client("evaluator"), chunk,
                      root=root, captions=captions, tau_safe=p.tau_safe, tau_help=p.tau_help)
        for d in b.kept:
            s2.append({"id": d.id, "status": "kept", "dialogue": d.model_dump()})
        for r in b.rejected:
            s2.append({**r, "status": "rejected"})
        progress.advance(len(chunk))
    progress.close()
    s2_recs = list(s2)
    kept = [Dialogue.model_validate(r["dialogue"]) for r in s2_recs if r["status"] == "kept"]
    sft, rl = sp.split_rl(kept, share=p.rl_share, min_turns=p.rl_min_turns, seed=p.seed)
    bench_items = [sp.bench_item(s) for s in bench]

    write_jsonl(sft, run.file(layout.SFT_FILE))
    write_jsonl(rl, run.file(layout.RL_FILE))
    write_jsonl(bench_items, run.file(layout.BENCH_FILE))
    write_jsonl(scripts, run.file("scripts.jsonl"))
    rejected = ([{"stage": "seeds", "reason": k, "count": v} for k, v in seed_skips.get("by_reason", {}).items()]
                + [{"stage": "stage1", **r} for r in stage1 if r["status"] == "skipped"]
                + [{"stage": "m4", **{k: v for k, v in r.items() if k != "transcript"}}
                   for r in m4_recs.values() if r["status"] == "rejected"]
                + [{"stage": "dedup", **d} for d in dups]
                + [{"stage": "stage2", **r} for r in s2_recs if r["status"] == "rejected"])
    atomic_write_text(run.file(layout.REJECTED_FILE), "".join(json.dumps(r, default=str) + "\n" for r in rejected))

    counts = {"sft": sp.split_counts(sft), "rl": sp.split_counts(rl), "bench": sp.split_counts(bench_items)}
    summary = {
        "seeds": {"by_kind": dict(Counter(kind_of.values())), "skipped": seed_skips},
        "scripts": {"by_kind": dict(Counter(s.kind for s in scripts)),
                    "by_strategy": dict(Counter(s.strategy for s in scripts)),
                    "obfuscated_fallbacks": sum(bool(s.meta.get("fallback")) for s in scripts),
                    "stage1_skipped": Counter(r.get("reason") for r in stage1 if r["status"] == "skipped")},
        "perturbed": len(perturbations),
        "m4": {"kept": sum(r["status"] == "kept" for r in m4_recs.values()),
               "rejected": sum(r["status"] == "rejected" for r in m4_recs.values())},
        "dedup_removed": len(dups),
        "stage2": {"kept": len(kept), "rejected": len(s2_recs) - len(kept),
                   "reasons": dict(Counter(reason_kind(r["reason"]) for r in s2_recs if r["status"] == "rejected"))},
        "splits": counts,
        "rejected_total": len(rejected),
        "turns_histogram": dict(Counter(len(d.user_texts) for d in sft + rl)),
    }
    summary = json.loads(json.dumps(summary, default=str))
    licenses = dict(Counter(f"{s.source}: {s.license}" for s in seeds))
    provenance = {"roles": roles.bindings, "prompts": PROMPTS, "licenses": licenses,
                  "images": {r: {k: v for k, v in i.items() if k in ("license", "source", "perturbed_from")}
                             for r, i in image_info.items() if r in used}}
    atomic_write_text(run.file("README.md"), sp.dataset_card(counts, run_id=run.id, provenance=provenance))
    run.update_manifest(roles_usage=roles.manifest(), synthesis=summary, prompts={k: k for k in PROMPTS})
    run.finish(**summary)
    return summary


