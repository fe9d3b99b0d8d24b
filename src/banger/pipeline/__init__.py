"""The step engine: named steps, each owning the undo of what it acquired.

Knows nothing about VMs. See ARCHITECTURE.md section 1 for the contract.
"""

from banger.pipeline.steps import Detail, Event, Step, StepFailed, run_steps

__all__ = ["Detail", "Event", "Step", "StepFailed", "run_steps"]
