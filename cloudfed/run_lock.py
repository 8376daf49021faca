"""One run of a federation at a time: a lock object on the federation's exchange prefix.

Why: two runs continuing the same federation would both train round r+1 from the same adapter
and race to publish it (the round record refuses the second, after both spent budget). The lock
is taken when a run prepares and removed when it ends. A lock left by a run that was killed is
taken over when its holder is provably gone: on the same host, its process no longer exists (or
is another process that reused the pid); elsewhere, its heartbeat is older than
`lock_timeout_minutes`. Everything else is refused with who holds the lock and how to clear it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cloudfed.errors import ConfigError
from cloudfed.exchange import Exchange

logger = logging.getLogger(__name__)
LOCK_KEY = "lock.json"


class LockLost(ConfigError):
    """Another run took the federation over (or the lock was removed by hand)."""


class LockHolder(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    host: str
    pid: int
    process_start: str = ""  # /proc start time, so a reused pid is not mistaken for the holder
    started_at: str
    heartbeat_at: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot; empty where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if fields[0] != "Z" else "zombie"


def _alive(holder: LockHolder) -> bool:
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _process_start(holder.pid)
    if start == "zombie":
        return False
    return not (holder.process_start and start and start != holder.process_start)


def _me(run_id: str) -> LockHolder:
    now = _now().isoformat(timespec="seconds")
    pid = os.getpid()
    return LockHolder(
        run_id=run_id,
        host=socket.gethostname(),
        pid=pid,
        process_start=_process_start(pid),
        started_at=now,
        heartbeat_at=now,
    )


def read_lock(exchange: Exchange) -> LockHolder | None:
    try:
        return LockHolder.model_validate_json(exchange.get_bytes(LOCK_KEY))
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable (the exchange is untrusted): nobody can be holding it
        return LockHolder(run_id="unreadable", host="?", pid=0, started_at="", heartbeat_at="")


def _stale(holder: LockHolder, timeout_minutes: float) -> str | None:
    """Why the holder is gone, or None when it may still be running."""
    if holder.run_id == "unreadable":
        return "the lock file is unreadable"
    if holder.host == socket.gethostname() and holder.pid > 0:  # here, liveness is certain
        alive = _alive(holder)
        return None if alive else f"its process {holder.pid} on {holder.host} no longer runs"
    try:
        beat = dt.datetime.fromisoformat(holder.heartbeat_at)
    except ValueError:
        return "its heartbeat is unreadable"
    age = (_now() - beat).total_seconds() / 60
    if age > timeout_minutes:
        return f"no heartbeat for {age:.0f} min (lock_timeout_minutes={timeout_minutes:g})"
    return None


def acquire(exchange: Exchange, run_id: str, *, federation_id: str, timeout_minutes: float) -> None:
    """Take the lock for `run_id`, taking over a dead holder's; ConfigError if it is held."""
    for _ in range(3):
        try:
            exchange.put_bytes(LOCK_KEY, _me(run_id).model_dump_json().encode(), exclusive=True)
            return
        except FileExistsError:
            pass
        holder = read_lock(exchange)
        if holder is None:
            continue  # released between our write and our read
        if holder.run_id == run_id:
            return
        why = _stale(holder, timeout_minutes)
        if why is None:
            raise ConfigError(
                f"federation {federation_id!r} is being run by run {holder.run_id} (pid "
                f"{holder.pid} on {holder.host}, since {holder.started_at}); two runs of one "
                "federation at once would train and publish the same rounds. Fix: wait for it to "
                f"end; if it is dead on another machine, delete {exchange.url(LOCK_KEY)} "
                "(make unlock)"
            )
        logger.warning(
            "cloudfed: taking over the lock of run %s on federation %s: %s",
            holder.run_id,
            federation_id,
            why,
        )
        exchange.delete(LOCK_KEY)
    raise ConfigError(f"could not take the lock {exchange.url(LOCK_KEY)}: it keeps changing hands")


def heartbeat(exchange: Exchange, run_id: str) -> None:
    """Refresh the heartbeat; a run that lost its lock stops instead of racing the new holder."""
    holder = read_lock(exchange)
    if holder is None or holder.run_id != run_id:
        raise LockLost(
            f"run {run_id} no longer holds {exchange.url(LOCK_KEY)} (now: "
            f"{'nobody' if holder is None else 'run ' + holder.run_id}); it stops here rather "
            "than publish rounds another run is also training"
        )
    beat = holder.model_copy(update={"heartbeat_at": _now().isoformat(timespec="seconds")})
    exchange.put_bytes(LOCK_KEY, beat.model_dump_json().encode())


def release(exchange: Exchange, run_id: str) -> None:
    """Remove the lock if `run_id` holds it; another run's lock is never touched."""
    holder = read_lock(exchange)
    if holder is not None and holder.run_id == run_id:
        exchange.delete(LOCK_KEY)
