"""FedAvgM (Hsu et al. 2019): server SGD with heavy-ball momentum over the round's mean delta.

As Flower's `FedAvgM`, in the delta's sign (Flower's pseudo-gradient is -d):

    u_t = momentum u_{t-1} + d_t   (u_0 = 0),     w_{t+1} = w_t + server_learning_rate u_t

Flower's defaults (learning rate 1, momentum 0) make it FedAvg; set `server_momentum` (Hsu et
al. use 0.9) for momentum. The momentum buffer is float32 in `ServerState.tensors`, kept only
when momentum > 0, so a continued run resumes it bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cloudfed.aggregation.params import parse_params
from cloudfed.aggregation.strategy import ServerState, Tensors, register_optimiser
from cloudfed.errors import AggregationError


class FedAvgMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server_learning_rate: float = Field(1.0, gt=0, allow_inf_nan=False)
    server_momentum: float = Field(0.0, ge=0, lt=1)


def _buffer(state: ServerState, global_adapter: Tensors, name: str) -> np.ndarray:
    """The stored momentum for `name`; zeros where none was kept (momentum was 0 before)."""
    key = f"momentum/{name}"
    if key not in state.tensors:
        return np.zeros(np.shape(global_adapter[name]), np.float64)
    if np.shape(state.tensors[key]) != np.shape(global_adapter[name]):
        raise AggregationError(
            f"the fedavgm server state's {key} has shape {np.shape(state.tensors[key])}, the "
            f"adapter's {np.shape(global_adapter[name])}. Fix: start_over: true"
        )
    return np.asarray(state.tensors[key], np.float64)


@dataclass(frozen=True)
class FedAvgM:
    params: FedAvgMParams
    name: str = "fedavgm"

    def init(self, global_adapter: Tensors) -> ServerState:
        return ServerState(strategy=self.name)

    def step(
        self, state: ServerState, global_adapter: Tensors, mean_delta: Tensors
    ) -> tuple[ServerState, dict[str, np.ndarray], dict[str, float]]:
        lr, beta = self.params.server_learning_rate, self.params.server_momentum
        unknown = sorted(set(state.tensors) - {f"momentum/{n}" for n in global_adapter})
        if unknown:
            raise AggregationError(
                f"the fedavgm server state holds {unknown[:3]}, not this adapter's momentum. "
                "Fix: start_over: true (the adapter changed shape)"
            )
        tensors: dict[str, np.ndarray] = {}
        new: dict[str, np.ndarray] = {}
        sq_update = sq_momentum = 0.0
        for name in sorted(global_adapter):
            d = np.asarray(mean_delta[name], np.float64)
            u = d
            if beta > 0:
                u32 = (beta * _buffer(state, global_adapter, name) + d).astype(np.float32)
                tensors[f"momentum/{name}"] = u32
                u = u32.astype(np.float64)
                sq_momentum += float(np.sum(u * u))
            update = lr * u
            new[name] = (np.asarray(global_adapter[name], np.float64) + update).astype(np.float32)
            sq_update += float(np.sum(update * update))
        diagnostics = {"update_norm": float(np.sqrt(sq_update))}
        if beta > 0:
            diagnostics["momentum_norm"] = float(np.sqrt(sq_momentum))
        new_state = ServerState(strategy=self.name, step=state.step + 1, tensors=tensors)
        return new_state, new, diagnostics


@register_optimiser("fedavgm")
def fedavgm(params: Mapping[str, Any]) -> FedAvgM:
    return FedAvgM(parse_params(FedAvgMParams, "fedavgm", params))
