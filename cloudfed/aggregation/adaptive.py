"""FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The two differ only in how the second moment follows the squared mean delta d^2 (Adam: an
exponential average; Yogi: a step of fixed size (1 - beta_2) d^2 towards it, so v grows slowly
when a rare large update arrives). Defaults and update rules are Flower's `FedAdam` / `FedYogi`:

    m_t = beta_1 m_{t-1} + (1 - beta_1) d_t
    v_t = beta_2 v_{t-1} + (1 - beta_2) d_t^2                          (Adam)
    v_t = v_{t-1} - (1 - beta_2) d_t^2 sign(v_{t-1} - d_t^2)           (Yogi)
    w_{t+1} = w_t + eta_t m_t / (sqrt(v_t) + tau)

with d_t the round's weighted mean delta (the negative pseudo-gradient) and m_0 = v_0 = 0. FedAdam
uses Flower's bias-corrected rate eta_t = eta sqrt(1 - beta_2^t) / (1 - beta_1^t) (Kingma and
Ba's alpha_t), with t the number of server steps the federation has taken including this one;
Flower counts t = server_round + 1, one ahead of Kingma and Ba, which we do not copy. FedYogi,
as in Flower and the paper, uses eta unchanged. The step counter and the moments live in
`ServerState`, so a continued run goes on with the same t, m and v.

The moments are float32 (the adapter's dtype, and what `server_state` stores), and each step
uses the float32 values it stores, so a continued run computes bit for bit what one run would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cloudfed.aggregation.strategy import ServerState, Tensors
from cloudfed.errors import AggregationError

SecondMoment = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


class AdaptiveParams(BaseModel):
    """`aggregation.params` of an adaptive optimiser; subclasses set the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: float = Field(gt=0, allow_inf_nan=False)  # server learning rate
    beta_1: float = Field(ge=0, lt=1)  # first-moment decay
    beta_2: float = Field(ge=0, lt=1)  # second-moment decay
    tau: float = Field(gt=0, allow_inf_nan=False)  # adaptivity: larger is closer to FedAvgM


def adam_second_moment(v: np.ndarray, d: np.ndarray, beta_2: float) -> np.ndarray:
    return beta_2 * v + (1.0 - beta_2) * d * d


def yogi_second_moment(v: np.ndarray, d: np.ndarray, beta_2: float) -> np.ndarray:
    d2 = d * d
    return v - (1.0 - beta_2) * d2 * np.sign(v - d2)


def moment_names(global_adapter: Tensors) -> list[str]:
    return [f"{k}/{name}" for k in ("m", "v") for name in sorted(global_adapter)]


def check_state(state: ServerState, global_adapter: Tensors, expected: list[str]) -> None:
    """A state for another adapter (other tensors or shapes) must not steer this one."""
    if sorted(state.tensors) != sorted(expected):
        raise AggregationError(
            f"the {state.strategy} server state holds tensors {sorted(state.tensors)[:3]}..., not "
            "the moments of this adapter. Fix: start_over: true (the adapter changed shape)"
        )
    for key in expected:
        name = key.split("/", 1)[1]
        if np.shape(state.tensors[key]) != np.shape(global_adapter[name]):
            raise AggregationError(
                f"the {state.strategy} server state's {key} has shape "
                f"{np.shape(state.tensors[key])}, the adapter's {np.shape(global_adapter[name])}"
            )


@dataclass(frozen=True)
class AdaptiveOptimiser:
    name: str
    params: AdaptiveParams
    second_moment: SecondMoment
    bias_corrected: bool

    def init(self, global_adapter: Tensors) -> ServerState:
        zeros = {
            key: np.zeros(np.shape(global_adapter[key.split("/", 1)[1]]), np.float32)
            for key in moment_names(global_adapter)
        }
        return ServerState(strategy=self.name, tensors=zeros)

    def eta_at(self, t: int) -> float:
        p = self.params
        if not self.bias_corrected:
            return p.eta
        return p.eta * float(np.sqrt(1.0 - p.beta_2**t)) / (1.0 - p.beta_1**t)

    def step(
        self, state: ServerState, global_adapter: Tensors, mean_delta: Tensors
    ) -> tuple[ServerState, dict[str, np.ndarray], dict[str, float]]:
        p = self.params
        check_state(state, global_adapter, moment_names(global_adapter))
        t = state.step + 1
        eta_t = self.eta_at(t)
        tensors: dict[str, np.ndarray] = {}
        new: dict[str, np.ndarray] = {}
        sq_update = abs_m = v_sum = 0.0
        count = 0
        for name in sorted(global_adapter):
            d = np.asarray(mean_delta[name], np.float64)
            m_prev = np.asarray(state.tensors[f"m/{name}"], np.float64)
            v_prev = np.asarray(state.tensors[f"v/{name}"], np.float64)
            m = (p.beta_1 * m_prev + (1.0 - p.beta_1) * d).astype(np.float32)
            v = self.second_moment(v_prev, d, p.beta_2).astype(np.float32)
            update = eta_t * m.astype(np.float64) / (np.sqrt(v.astype(np.float64)) + p.tau)
            base = np.asarray(global_adapter[name], np.float64)
            new[name] = (base + update).astype(np.float32)
            tensors[f"m/{name}"], tensors[f"v/{name}"] = m, v
            sq_update += float(np.sum(update * update))
            abs_m += float(np.sum(np.abs(m), dtype=np.float64))
            v_sum += float(np.sum(v, dtype=np.float64))
            count += m.size
        diagnostics = {
            "update_norm": float(np.sqrt(sq_update)),
            "eta": eta_t,
            "m_mean_abs": abs_m / max(count, 1),
            "v_mean": v_sum / max(count, 1),
        }
        return ServerState(strategy=self.name, step=t, tensors=tensors), new, diagnostics
