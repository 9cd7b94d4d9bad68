"""On Vast, the runner destroys its own instance when it gives up, so an orphan stops billing.

It gives up when the relay answered 410 (the run is closed), when nothing reached the relay for
the orphan timeout (the orchestrator is gone), or when the run passed its max runtime. By then
the runner has stopped the trainer and uploads nothing further.

Vast puts `CONTAINER_ID` and an instance-scoped `CONTAINER_API_KEY` in the container's
environment, which is PID 1's environment: a process started later (an onstart shell, say) may
not inherit it, so both are read from this process's environment first, then from
/proc/1/environ. Without them (the local provider, dev) this does nothing and the runner just
exits.

The call is plain httpx against Vast's REST API (`DELETE /api/v0/instances/{id}/`), not the
`vastai` SDK: the GPU image installs only what `gpu_runner` imports. If the scoped key may not
destroy (401/403), the instance is stopped instead (`PUT {"state": "stopped"}`: no GPU billing),
and the orchestrator's reaper destroys it once its run is closed. The key is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Literal

import httpx

log = logging.getLogger("gpu_runner.self_destroy")

LeaveReason = Literal["closed", "orphaned", "max_runtime"]
PID1_ENVIRON = Path("/proc/1/environ")
ATTEMPTS = 4
RETRY_DELAY_S = 2.0


def _pid1_environment(path: Path = PID1_ENVIRON) -> dict[str, str]:
    try:
        raw = path.read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {
        name.decode("utf-8", "replace"): value.decode("utf-8", "replace") for name, value in pairs
    }


def instance_credentials(pid1_environ: Path = PID1_ENVIRON) -> tuple[str, str] | None:
    """(instance id, instance-scoped key) from this process's or PID 1's environment."""
    for env in (os.environ, _pid1_environment(pid1_environ)):
        instance_id, key = env.get("CONTAINER_ID", ""), env.get("CONTAINER_API_KEY", "")
        if instance_id.strip().isdigit() and key.strip():
            return instance_id.strip(), key.strip()
    return None


async def destroy_own_instance(
    api_url: str,
    reason: LeaveReason,
    *,
    timeout_s: float = 30.0,
    pid1_environ: Path = PID1_ENVIRON,
) -> bool:
    """Destroy (or failing that, stop) this instance; True when Vast accepted either."""
    credentials = instance_credentials(pid1_environ)
    if credentials is None:
        return False
    instance_id, key = credentials
    url = f"{api_url.rstrip('/')}/api/v0/instances/{instance_id}/"
    headers = {"Authorization": f"Bearer {key}"}
    log.warning("giving up (%s): destroying this Vast instance %s", reason, instance_id)
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as client:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = await client.request("DELETE", url, json={})
                if response.status_code in (401, 403):
                    log.warning(
                        "the instance key may not destroy instance %s (HTTP %d): stopping it; "
                        "the reaper destroys it",
                        instance_id,
                        response.status_code,
                    )
                    response = await client.put(url, json={"state": "stopped"})
            except httpx.HTTPError as e:
                problem = type(e).__name__
            else:
                if response.is_success or response.status_code == 404:
                    return True
                problem = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    log.error("Vast refused to destroy instance %s: %s", instance_id, problem)
                    return False
            log.warning(
                "destroying instance %s failed (%s), attempt %d of %d",
                instance_id,
                problem,
                attempt,
                ATTEMPTS,
            )
            if attempt < ATTEMPTS:
                await asyncio.sleep(RETRY_DELAY_S * attempt)
    return False
