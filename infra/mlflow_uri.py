"""Print the active stack's MLflow tracking URI (for `make ui`)."""

from zenml.client import Client

tracker = Client().active_stack.experiment_tracker
if tracker is None:
    raise SystemExit("The active ZenML stack has no experiment tracker. Fix: run `make stack`.")
print(tracker.get_tracking_uri())
