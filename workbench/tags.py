"""Every MLflow tag the workbench writes or reads, by name (as MLflow keeps its own in `mlflow/utils/mlflow_tags.py`).

Tag strings are part of the public interface: stored runs, the app and outside scripts read them, so a value
here never changes; new tags are added.
"""

# --- what a run is: set when it starts (workbench/launch.py) -------------------------------------------------
STAGE = "workbench.stage"  # the config's `stage:` name; "callback" for a run opened by WorkbenchCallback
CONFIG_HASH = "workbench.config_hash"  # content hash of the resolved config: equal hashes, equal settings
CONFIG_FILE = "workbench.config_file"
GIT_COMMIT = "workbench.git_commit"  # the workbench's own source tree
PROCESSES = "workbench.processes"  # > 1 under `accelerate launch`; rank 0 logs for every rank
HOST = "workbench.host"  # host, pid and the pid's start time: which process trains the run (workbench/liveness.py)
PID = "workbench.pid"
PID_STARTED = "workbench.pid_started"  # seconds since the epoch: pids get reused
MODEL_CLASS = "workbench.model_class"  # the trained model's class, in a callback's run

# --- what a stage records while it trains -------------------------------------------------------------------
DEVICE = "workbench.device"
PARAMETERS = "workbench.parameters"  # the model's parameter count
DATA_FORMAT = "workbench.data_format"  # the TRL format of the stage's data
REWARD = "workbench.reward"  # the RL stages' reward function
REWARD_MODEL = "workbench.reward_model"
POLICY_MODEL = "workbench.policy_model"  # the model an RL stage's policy started from
BASE_MODEL = "workbench.base_model"  # the model a stage trained on the fly started from
MODEL_URI = "workbench.model_uri"  # where a finished stage's model is (runs:/<run_id>/model)
GEOMETRY_OFFLINE = "workbench.geometry_offline"  # features moved offline for exceeding the time budget
CHAIN_PREFIX = "workbench.chain."  # workbench.chain.<i>.run_id / .stage: a chain's stages


def chain_stage_tags(index: int, run_id: str, config_file: str) -> dict[str, str]:
    """The tags a chain's parent run keeps for its stage `index`."""
    return {f"{CHAIN_PREFIX}{index}.run_id": run_id, f"{CHAIN_PREFIX}{index}.stage": config_file}


# --- how a run ended -----------------------------------------------------------------------------------------
STOP_REASON = "workbench.stop_reason"
STOPPED_AT = "workbench.stopped_at_step"
ERROR = "workbench.error"  # the exception a FAILED run died of
REPORT_ERROR = "workbench.report_error"  # why its report.html could not be written (workbench/report.py)
RESUMED = "workbench.resumed"  # "from step S at TIME (was STATUS: REASON)", the latest `workbench resume`

# --- the policy engine's record -------------------------------------------------------------------------------
ALERT_PREFIX = "workbench.alert."  # + rule name: {"step", "message"} of its latest alert
EVENT_PREFIX = "workbench.event."  # + forecaster name: {"step", ...details} of its latest event

# --- requests to a live run, polled by its engine (workbench/policies/requests.py) -----------------------------
STOP_REQUESTED = "workbench.stop_requested"  # set by `workbench stop` and the app
CHECKPOINT_REQUESTED = "workbench.checkpoint_requested"  # the app's "Checkpoint now"
ATTACHED_POLICY = "workbench.attached_policy"  # a policy attached by `workbench attach`
ATTACHED_POLICY_APPLIED = "workbench.attached_policy_applied"  # set by the run: the step it took those rules at
