"""The relay's upload URLs for saved epochs: presigned PUTs under the run's own prefix, for a
request signed with that run's secret while the run is open; nothing else gets one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx

from gpu_runner import protocol
from gpu_runner.protocol import UploadUrls, UploadUrlsRequest
from tests.http_support import serve_asgi
from worker.relay import create_app
from worker.settings import Settings

from .test_relay import Run, http, master, relay_settings, run

__all__ = ["http", "master", "relay_settings", "run"]


def signed(secret: str, request: UploadUrlsRequest | bytes) -> tuple[bytes, dict[str, str]]:
    body = request if isinstance(request, bytes) else request.model_dump_json().encode()
    msg_id = "uploads-1"
    return body, protocol.sign_payload(secret, msg_id, body, datetime.now(UTC))


async def test_a_signed_request_gets_one_put_per_file_under_the_runs_epoch_folder(
    dev_env: Any, relay_settings: Settings, run: Run, master: str, http: httpx.AsyncClient, s3: Any
) -> None:
    execution = run.handle.first_execution_run_id or run.handle.result_run_id
    assert execution is not None
    secret = protocol.derive_run_secret(master, run.id, execution)
    asked = UploadUrlsRequest(
        run_id=run.id, attempt=2, epoch=7, files=["lora.safetensors", "samples/00.png"]
    )
    with serve_asgi(create_app(relay_settings, dev_env.client)) as relay:
        url = f"{relay}/v1/runs/{run.id}/executions/{execution}/uploads"
        response = await http.post(url, content=(sent := signed(secret, asked))[0], headers=sent[1])
        assert response.status_code == 200, response.text
        urls = UploadUrls.model_validate_json(response.content)
        prefix = f"runs/{run.id}/{execution}/epochs/0007"
        assert urls.keys == {
            "lora.safetensors": f"{prefix}/lora.safetensors",
            "samples/00.png": f"{prefix}/samples/00.png",
        }
        assert urls.expires_in_s == relay_settings.epoch_upload_url_ttl_s
        # The URLs write exactly those keys, and only those.
        put = await http.put(urls.urls["samples/00.png"], content=b"png bytes")
        assert put.status_code == 200
        stored = s3.get_object(Bucket=urls.bucket, Key=f"{prefix}/samples/00.png")
        assert stored["Body"].read() == b"png bytes"
        elsewhere = urls.urls["lora.safetensors"].replace("lora.safetensors", "other.bin", 1)
        assert (await http.put(elsewhere, content=b"x")).status_code == 403

        # Another run's secret, the id-only secret, a body for another run, a path outside the
        # epoch folder: refused, with a reason.
        forged = protocol.derive_run_secret(master, "another-run", execution)
        for secret_used, body, status, reason in [
            (forged, asked, 401, "signature"),
            (protocol.derive_run_secret(master, run.id), asked, 401, "signature"),
            (secret, asked.model_copy(update={"run_id": "another-run"}), 400, "another-run"),
            (secret, b'{"run_id": "x", "files": ["../job-1.json"]}', 400, "not an upload"),
        ]:
            body_bytes, headers = signed(secret_used, body)
            refused = await http.post(url, content=body_bytes, headers=headers)
            assert refused.status_code == status, refused.text
            assert reason in refused.json()["error"]

        # Once the run is closed no GPU gets a URL for it.
        await run.handle.terminate("test over")
        response = await http.post(url, content=(sent := signed(secret, asked))[0], headers=sent[1])
        assert response.status_code == 410, response.text
