"""`aggregation.params` as each server optimiser's own pydantic model.

The block is a free mapping in `AggregationSettings` (its keys depend on the strategy), so each
optimiser validates it here and the error names `aggregation.params.<field>` and lists what the
strategy takes, with its defaults: the run config is where the user fixes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cloudfed.errors import AggregationError

P = TypeVar("P", bound=BaseModel)

# Keys people bring from Flower that mean something else here.
_HINTS = {
    "eta_l": "the client learning rate is training.learning_rate",
    "proximal_mu": "FedProx's mu is aggregation.proximal_mu, beside params",
}


def parse_params(model: type[P], strategy: str, params: Mapping[str, Any]) -> P:
    """`model` validated from `params`, or an `AggregationError` naming each bad field."""
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        takes = ", ".join(
            f"{name} (default {field.default!r})" for name, field in model.model_fields.items()
        )
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err.get("loc", ()))
            msg = err.get("msg", "invalid")
            if err.get("type") == "extra_forbidden":
                msg = f"{strategy} has no such parameter" + (
                    f" ({_HINTS[key]})" if key in _HINTS else ""
                )
            else:
                msg += f" (got {err.get('input')!r})"
            problems.append(f"aggregation.params.{key}: {msg}")
        raise AggregationError(
            "; ".join(problems) + f"; aggregation.strategy {strategy} takes {takes}"
        ) from None
