"""A Temporal worker with the Vast provider in a process of its own, so a test can kill it -9.

    python -m tests.vast_worker_process     (settings from LORA_* variables, as the real worker)

It builds the provider itself, as the in-process test workers do: the fake Vast API, the relay and
S3 are on loopback addresses that `worker.main.gpu_provider` rightly refuses for real GPUs.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from activities.providers.vast import VastProvider
from common.settings import Settings
from common.temporal import connect_client
from worker.main import build_worker


async def main() -> None:
    settings = Settings()
    client = await connect_client(settings)
    with ThreadPoolExecutor(max_workers=8) as executor:
        worker = build_worker(client, settings, executor, VastProvider(settings))
        await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
