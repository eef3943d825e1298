"""Names of the files and folders the stages write, defined once.

A checkpoint folder (train, export) holds WEIGHTS, CONFIG, PROCESSOR_CONFIG and the tokenizer
files; a run folder adds RUN_CONFIG, SUMMARY, LOG_HISTORY and LOSS_CURVE; a chunked stage's
folder holds DATASET, REJECTS, SUMMARY and PARTS; an eval folder REPORT_JSON, REPORT_MD and
SCORES_PLOT.
"""

WEIGHTS = "model.safetensors"  # trainable weights (or the whole model, for a full export)
WEIGHTS_INDEX = "model.safetensors.index.json"  # the shard list of a large full export
CONFIG = "config.json"
PROCESSOR_CONFIG = "desta_processor.json"
RUN_CONFIG = "run_config.yaml"  # the resolved settings of a training run
SUMMARY = "summary.json"
LOG_HISTORY = "log_history.json"
LOSS_CURVE = "loss_curve.png"
DATASET = "dataset"  # a `datasets` folder (save_to_disk)
REJECTS = "rejects.jsonl"  # rows a stage could not use, each with its reason
PARTS = "parts"  # finished chunks of a resumable stage
MANIFEST = "manifest.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SCORES_PLOT = "scores.png"
MODEL_CARD = "README.md"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
FORGETTING_PLOT = "forgetting.png"
REPLAY_SWEEP_PLOT = "replay_sweep.png"
