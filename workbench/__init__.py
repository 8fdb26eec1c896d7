"""Training-dynamics workbench core: configs, tracking, snapshots, instrumentation and the CLI.

Heavy libraries (torch, transformers, mlflow) are imported lazily by the modules that need them, so
that `workbench --help` answers at once.
"""

import os

# With the default spinning OpenMP threads, a second process sharing the cores slows a small model down by an order
# of magnitude (its idle threads spin instead of yielding); the policy only takes effect if it is set before torch
# loads its OpenMP runtime, hence here, before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str) -> object:
    # `from workbench import WorkbenchCallback` works, while `import workbench` stays free of transformers.
    if name == "WorkbenchCallback":
        from workbench.callback import WorkbenchCallback

        return WorkbenchCallback
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
