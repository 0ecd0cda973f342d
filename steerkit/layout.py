"""The run-directory contract: every file name a stage writes or reads, and the method's limits.

Each stage writes into ``papermill_runs/<stage>/<run_id>/`` and the next stage reads from there by
these names. Nothing else in the package spells a file name of the contract.
"""

# The method's limits (docs/method.md section 4 and 6).
MAX_TURNS = 10  # a dialogue stops after 10 user turns (method.md 4: max_turns 10)

# Every run directory.
MANIFEST_FILE = "manifest.json"  # parameters, roles, prompts, versions, seeds, summary
REPLY_CACHE = "cache"  # content-addressed reply cache of a run's served roles (one JSONL per role)
CHECKPOINT = "checkpoint"  # a training run's final model, loadable as hf:<run>/checkpoint
TRAIN_LOG = "train_log.jsonl"  # the trainer's logged losses, one line per logging step
PROGRESS_FILE = "progress.jsonl"  # where a running stage is (steerkit.progress), read by steerkit run

# Stage I (01_synthesize_steer) writes, stages II-IV read.
SEEDS_FILE = "seeds.jsonl"
SCRIPTS_FILE = "scripts.jsonl"
FORENSIC_FILE = "forensic.jsonl"
SFT_FILE = "steer_sft.jsonl"
RL_FILE = "steer_rl.jsonl"
BENCH_FILE = "steer_bench.jsonl"
REJECTED_FILE = "rejected.jsonl"
CAPTIONS_FILE = "captions.json"  # image ref -> caption, for text-only students and tutors

# Stages II and III (02_sft_bootstrap, 03_grpo_tutor_tcsr): resumable trainer checkpoints.
TRAINER_DIR = "trainer"  # trainer/checkpoint-N, one folder per saved step
TRAINER_STATE = "trainer_state.json"  # in each checkpoint-N: the step it holds

# Stage III (03_grpo_tutor_tcsr).
METRICS_FILE = "metrics.jsonl"  # one line of rollout metrics per GRPO step
TRAJECTORIES_FILE = "trajectories.jsonl"  # every rolled-out trajectory, as text with its scores

# Stage IV (04_steer_bench_analysis) and any evaluation run.
DIALOGUES_FILE = "dialogues.jsonl"
RATES_FILE = "rates.csv"  # Safety and Helpfulness per model and subset, with bootstrap intervals
SURVIVAL_FILE = "survival.csv"  # Kaplan-Meier curves per model and subset
FAILURE_TURNS_FILE = "failure_turns.csv"  # first failing turn per model and subset
RESULTS_FILE = "metrics.json"  # an analysis run's results and the runs they came from (04 and 05)

# The pipeline (steerkit run).
PIPELINE_MANIFEST = "pipeline.json"

# A sweep (steerkit sweep): the cells of its grid, their parameters and run directories.
SWEEP_MANIFEST = "sweep.json"

# A study (05_studies) over a sweep.
TIDY_FILE = "tidy.csv"  # one row per run x subset x metric
OVER_SEEDS_FILE = "over_seeds.csv"  # each arm's mean and interval across seeds
PAIRED_FILE = "paired.csv"  # paired differences between arms, item by item
