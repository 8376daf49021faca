#!/usr/bin/env bash
# Register, idempotently, the embedded default stack: local orchestrator and artifact store, MLflow
# on sqlite inside the artifact store (no tracking URI = ZenML's local sqlite store).
set -euo pipefail
BIN=${1:-.venv/bin}
STACK=${2:-cloudfed-local}
TRACKER=mlflow_local
Z="$BIN/zenml"
if ! "$Z" experiment-tracker describe "$TRACKER" >/dev/null 2>&1; then
  "$Z" experiment-tracker register "$TRACKER" --flavor=mlflow >/dev/null
fi
if ! "$Z" stack describe "$STACK" >/dev/null 2>&1; then
  "$Z" stack register "$STACK" -o default -a default -e "$TRACKER" >/dev/null
fi
# ZenML announces the switch on stderr; the line below says it once (or what failed).
out=$("$Z" stack set "$STACK" 2>&1) || { echo "$out" >&2; exit 1; }
echo "ZenML stack '$STACK' is active (experiment tracker: $TRACKER, MLflow on sqlite)."
