"""The ``steerkit`` command: run the pipeline, or one stage, headlessly with papermill.

    steerkit run --profile smoke                      # the offline CPU demo (make demo)
    steerkit run --profile full --set 03.alpha=0.5    # the paper-scale run, one value changed
    steerkit run --profile smoke --run-id ID          # resume a killed pipeline (finished stages skip)
    steerkit run --profile smoke --resume             # the same, for the latest unfinished one
    steerkit run --profile smoke --run-id ID --stages 04   # rerun only the evaluation
    steerkit stage 04 --set model_runs='[papermill_runs/x/02_sft_bootstrap/sft]'   # one notebook alone
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from steerkit.notebooks import NOTEBOOKS_DIR, StageError
from steerkit.runs import DEFAULT_RUNS_ROOT

log = logging.getLogger("steerkit")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="smoke",
                   help="recipe configs/pipeline_<profile>.yaml: smoke (offline CPU) or full (GPU, served tutor and"
                        " judge); 'none' for notebook defaults")
    p.add_argument("--config", action="append", default=[], metavar="RECIPE.yaml",
                   help="a recipe merged over the profile's (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="[STAGE.]PARAM=VALUE",
                   help="override a parameter (value read as YAML); without STAGE it applies to every notebook"
                        " declaring PARAM")
    p.add_argument("--run-id", help="the pipeline run folder under --runs-root; an existing one is resumed")
    p.add_argument("--runs-root", type=Path, default=DEFAULT_RUNS_ROOT, help="default: papermill_runs/")
    p.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help="where the numbered notebooks live")
    p.add_argument("-v", "--verbose", action="store_true", help="stream cell outputs as the notebooks run")
    p.add_argument("--no-progress", action="store_true",
                   help="do not print each stage's progress (steps, rollouts, judged turns)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerkit", description="Run the SaFeR-Steer notebooks headlessly.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline 01 -> 02 -> 03 (TCSR, mean) -> 04; resumable")
    _common(run)
    run.add_argument("--stages", help="comma-separated stages to run (e.g. 01,02 or 04; 03 means both GRPO runs)")
    run.add_argument("--resume", action="store_true", help="resume the latest unfinished pipeline of this profile")
    stage = sub.add_parser("stage", help="run one numbered notebook on its own (inputs given with --set)")
    stage.add_argument("stage", help="a stage: 01, 02, 03_tcsr, 03_mean or 04 (or a notebook number)")
    _common(stage)
    sweep = sub.add_parser("sweep", help="a grid over 03's parameters from one SFT checkpoint,"
                           " evaluated by 04, read by 05; resumable per cell")
    _common(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="PARAM=V1,V2",
                       help="a grid axis over a notebook-03 parameter (values read as YAML;"
                       " replaces the recipe's axis)")
    sweep.add_argument("--resume", action="store_true",
                       help="resume the latest unfinished sweep of this profile")
    sweep.add_argument("--plan", action="store_true", help="list the cells and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # papermill's own parameter-cell parser misreads comments holding "=" and then warns of
        # "unknown" parameters; steerkit.notebooks.check_parameters checks them properly instead.
        logging.getLogger("papermill").setLevel(logging.ERROR)
    from steerkit import pipeline as pl

    profile = None if args.profile == "none" else args.profile
    if args.command == "sweep":
        from steerkit.sweep import command

        return command(args, profile)
    try:
        recipe = pl.load_recipe(profile, args.config)
        if args.command == "run":
            run_id = args.run_id
            if args.resume and run_id is None:
                run_id = pl.latest_unfinished(args.runs_root, profile)
                if run_id is None:
                    raise ValueError(f"no unfinished {profile or ''} pipeline under {args.runs_root} to resume")
            run_id = run_id or pl.new_pipeline_id(profile)
            pipe = pl.Pipeline(recipe, run_id, runs_root=args.runs_root, notebooks_dir=args.notebooks_dir,
                               sets=args.sets, log_output=args.verbose, show_progress=not args.no_progress)
            log.info("pipeline %s (resume it with: %s)", pipe.path, pl.resume_command("run", args, run_id))
            manifest = pipe.run(args.stages.split(",") if args.stages else None)
        else:
            stages = [s for s in pl.STAGES if args.stage in (s.key, s.notebook)][:1]
            if not stages:
                raise ValueError(f"no stage {args.stage!r}; stages are {', '.join(s.key for s in pl.STAGES)}")
            # Alone, a stage reads no other stage: the run dirs it needs come from --set.
            alone = pl.Stage(stages[0].key, stages[0].notebook, stages[0].run_id)
            run_id = args.run_id or pl.new_pipeline_id(f"stage{alone.key}")
            pipe = pl.Pipeline(recipe, run_id, runs_root=args.runs_root, notebooks_dir=args.notebooks_dir,
                               stages=(alone,), sets=args.sets, log_output=args.verbose,
                               show_progress=not args.no_progress)
            manifest = pipe.run()
    except (StageError, ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        log.error("%s", e)
        return 1
    print("\n".join(pl.summary_lines(manifest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
