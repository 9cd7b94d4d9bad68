"""P5 (runner setup vs the slower download alone) and P7 (runner overhead on trainer wall time).

The runner runs as a real process (`python -m gpu_runner`) against SeaweedFS and the tests'
recording relay over HTTP, with bench.standin's fixed-step trainer.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import MB, Row, child_pid, cpu_seconds, local_s3, median, s3_client
from bench.shaping import shaped_proxy
from bench.standin import FixedStepTrainer
from gpu_runner.downloads import CHUNK_BYTES
from gpu_runner.protocol import RunnerLimits, TrainingConfig
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers.base import PreparedTraining, TrainingInputs
from tests.http_support import serve_asgi
from tests.images import PNG
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import MASTER_SECRET, Job, make_job, run_runner, runner_env

EPOCHS = 2
RUNS = 3
STATE_BYTES = 4 * MB
LIMITS = RunnerLimits(max_runtime_s=900, orphan_timeout_s=120, heartbeat_interval_s=60)


def _images_zip(total_bytes: int, image_bytes: int = MB) -> bytes:
    """Stored (not deflated) "images": a real PNG followed by random bytes, as uploads are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for i in range(total_bytes // image_bytes):
            archive.writestr(f"img{i:04d}.png", PNG + os.urandom(image_bytes - len(PNG)))
            archive.writestr(f"img{i:04d}.txt", f"photo {i}")
    return buffer.getvalue()


def _run_runner(
    s3: Any,
    relay: RecordingRelay,
    relay_url: str,
    work: Path,
    name: str,
    *,
    epoch_uploads: bool = False,
    **job: Any,
) -> tuple[float, dict[str, float], Job]:
    """One runner process to completion: its wall time, the trainer's own start/end, the job.
    With `epoch_uploads` every epoch (its LoRA and STATE_BYTES of state) goes up as it ends."""
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"
    spec = make_job(
        s3,
        "bench",
        lambda run_id: relay.events_url(relay_url, run_id),
        limits=LIMITS,
        training=TrainingConfig(epochs=EPOCHS),
        run_id=run_id,
        epoch_uploads_url=relay.uploads_url(relay_url, run_id) if epoch_uploads else None,
        **job,
    )
    times = work / f"{name}-train.json"
    env = runner_env(
        spec.job_url,
        work / name,
        trainer_factory="bench.standin:FixedStepTrainer",
        progress_interval_s="10",  # the image's default: the trainer reports every step
    )
    env["BENCH_TRAIN_TIMES"] = str(times)
    env["FAKE_STATE_BYTES"] = str(STATE_BYTES)
    finished = run_runner(env, work / f"{name}.log", timeout_s=300)
    if finished.code != 0:
        raise RuntimeError(f"runner exited {finished.code}: {finished.log[-2000:]}")
    return finished.seconds, json.loads(times.read_text()), spec


async def _trainer_alone(work: Path) -> float:
    """The same trainer in this process with nothing around it: no runner, no-op progress; it
    writes its epochs' states as it does under the runner, and nobody uploads them."""
    os.environ["FAKE_STATE_BYTES"] = str(STATE_BYTES)
    inputs = TrainingInputs(
        run_dir=work,
        dataset_dir=work,
        model_path=Path(__file__),
        family="sd15",
        config=TrainingConfig(epochs=EPOCHS),
        output_dir=work,
        cuda=False,
        on_epoch=lambda saved: None,
    )
    trainer = FixedStepTrainer(RunnerSettings())
    prepared = PreparedTraining(inputs=inputs, total_steps=None, paths={})
    started = time.monotonic()
    await trainer.train(prepared, lambda progress: None)
    return time.monotonic() - started


def p7_runner_overhead() -> Row:
    with (
        tempfile.TemporaryDirectory(prefix="bench-p7-") as tmp,
        local_s3() as endpoint,
    ):
        work = Path(tmp)
        s3 = s3_client(endpoint)
        recorder = RecordingRelay(MASTER_SECRET, presigner=s3, bucket="bench")
        under_runner: list[float] = []
        processes: list[float] = []
        alone: list[float] = []
        with serve_asgi(recorder.app) as relay_url:
            for i in range(RUNS):
                alone.append(asyncio.run(_trainer_alone(work)))
                wall, times, _ = _run_runner(
                    s3, recorder, relay_url, work, f"p7-{i}", epoch_uploads=True
                )
                under_runner.append(times["end"] - times["start"])
                processes.append(wall)
        samples_on, samples_off = _builtin_with_and_without_samples(work)
    trained, baseline = median(under_runner), median(alone)
    overhead = trained / baseline - 1
    uploaded = len(recorder.upload_requests)
    return Row(
        "P7",
        "runner overhead on trainer wall time",
        f"{trained:.3f} s training under the runner (median of {RUNS})",
        f"trainer alone {baseline:.3f} s",
        f"{trained / baseline:.4f} x ({overhead:+.2%})",
        "< 1 %",
        overhead < 0.01,
        f"{EPOCHS * FixedStepTrainer.steps_per_epoch} steps of {FixedStepTrainer.step_s * 1000:g}"
        f" ms, progress to the runner every step, every epoch uploaded while the next trains"
        f" ({uploaded} epochs, LoRA + {STATE_BYTES // MB} MB state + manifest each, samples"
        f" off); whole runner process (start, job, tiny downloads, training, uploads, exit)"
        f" {median(processes):.2f} s. Samples on (builtin trainer, tiny model, CPU, the"
        f" default 2 samples x 20 steps per epoch): {samples_on:.2f} s per epoch against"
        f" {samples_off:.2f} s without ({samples_on / samples_off - 1:+.0%})",
    )


def _builtin_with_and_without_samples(work: Path) -> tuple[float, float]:
    """Seconds per epoch of the builtin trainer on the demo's tiny model, with the default
    samples and without (in this process, no runner)."""
    from gpu_runner.demo_assets import build_tiny_model, demo_training_config, write_demo_dataset
    from gpu_runner.protocol import SampleSettings
    from gpu_runner.trainers.builtin import BuiltinTrainer

    model = build_tiny_model(work / "tiny.safetensors")
    write_demo_dataset(work / "dataset" / "shapes")
    epochs = 3
    per_epoch = []
    for samples in (SampleSettings(), SampleSettings(enabled=False)):
        inputs = TrainingInputs(
            run_dir=work,
            dataset_dir=work / "dataset",
            model_path=model,
            family="sd15",
            config=demo_training_config().model_copy(update={"epochs": epochs}).for_family("sd15"),
            output_dir=work / f"builtin-{samples.enabled}",
            cuda=False,
            samples=samples,
            on_epoch=lambda saved: None,
        )
        trainer = BuiltinTrainer(RunnerSettings())
        prepared = trainer.prepare(inputs)
        started = time.monotonic()
        asyncio.run(trainer.train(prepared, lambda progress: None))
        per_epoch.append((time.monotonic() - started) / epochs)
    return per_epoch[0], per_epoch[1]


def _download_alone(url: str, dest: Path) -> float:
    """A plain download as the runner receives one (http.client, each read written to disk as it
    returns), without the runner's sha256, resume or progress."""
    started = time.monotonic()
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}")
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"GET {parts.path}: HTTP {response.status}")
        with dest.open("wb") as out:
            while chunk := response.read1(CHUNK_BYTES):
                out.write(chunk)
    finally:
        connection.close()
    return time.monotonic() - started


def _downloads_together(job: Job, work: Path) -> float:
    """Both plain downloads at the same time, each on a thread of its own, as the runner runs
    them."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(
            pool.map(
                _download_alone,
                [job.spec.images.url, job.spec.model.url],
                [work / "images.zip", work / "model.bin"],
            )
        )
    return time.monotonic() - started


@dataclass
class _Setup:
    """One way of serving the files: the runner's setup and the plain downloads, in seconds."""

    setups: list[float] = field(default_factory=list)
    slower: list[float] = field(default_factory=list)
    together: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(
        default_factory=lambda: {"images.ready": [], "model.ready": []}
    )
    # Cores busy while both plain downloads ran at once: S3 server, downloading process.
    together_cores: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return median(self.setups) / median(self.slower)


def _measure_setup(
    s3: Any, recorder: RecordingRelay, relay_url: str, work: Path, images: bytes, model: bytes
) -> _Setup:
    """RUNS runner processes from gpu.ready to files.ready, each followed by the plain downloads
    of the same two files: one at a time (the baseline) and both at once."""
    measured = _Setup()
    s3_server = child_pid("weed")
    for i in range(RUNS):
        before = len(recorder.answers)
        _, _, job = _run_runner(
            s3, recorder, relay_url, work, f"p5-{i}", images_zip=images, model_content=model
        )
        received = {
            a.event.type: a.at
            for a in recorder.answers[before:]
            if a.event is not None and a.status == 202
        }
        measured.setups.append(received["files.ready"] - received["gpu.ready"])
        for name in ("images.ready", "model.ready"):
            measured.phases[name].append(received[name] - received["gpu.ready"])
        measured.slower.append(
            max(
                _download_alone(job.spec.images.url, work / "images.zip"),
                _download_alone(job.spec.model.url, work / "model.bin"),
            )
        )
        server_cpu, own_cpu = cpu_seconds(s3_server), time.process_time()
        wall = _downloads_together(job, work)
        measured.together.append(wall)
        measured.together_cores.append(
            ((cpu_seconds(s3_server) - server_cpu) / wall, (time.process_time() - own_cpu) / wall)
        )
    return measured


def p5_runner_setup(model_mb: int = 200, images_mb: int = 100, link_mb_s: int = 50) -> Row:
    """On loopback, and through a proxy pacing each connection to `link_mb_s` (a GPU host's
    download from a remote store): loopback figures on 2 cores are bound by the CPU."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-p5-") as tmp,
        local_s3() as endpoint,
        shaped_proxy(endpoint, link_mb_s * MB) as shaped,
    ):
        work = Path(tmp)
        images = _images_zip(images_mb * MB)
        model = os.urandom(model_mb * MB)
        recorder = RecordingRelay(MASTER_SECRET)
        with serve_asgi(recorder.app) as relay_url:
            loopback = _measure_setup(s3_client(endpoint), recorder, relay_url, work, images, model)
            paced = _measure_setup(s3_client(shaped), recorder, relay_url, work, images, model)
    server_cores = median([c[0] for c in loopback.together_cores])
    client_cores = median([c[1] for c in loopback.together_cores])
    return Row(
        "P5",
        f"runner setup: {model_mb} MB model + {images_mb} MB zip downloaded, verified, unzipped",
        f"loopback: {median(loopback.setups):.2f} s gpu.ready -> files.ready;"
        f" {link_mb_s} MB/s per connection: {median(paced.setups):.2f} s (medians of {RUNS})",
        f"slower download alone: loopback {median(loopback.slower):.2f} s;"
        f" {link_mb_s} MB/s: {median(paced.slower):.2f} s",
        f"loopback {loopback.ratio:.2f} x; {link_mb_s} MB/s {paced.ratio:.2f} x",
        "<= 1.05 x",
        loopback.ratio <= 1.05,
        f"SeaweedFS on loopback. The plain downloads receive as the runner does (http.client,"
        f" a thread each), without its sha256. After gpu.ready: images.ready (downloaded,"
        f" verified, unzipped) at {median(loopback.phases['images.ready']):.2f} s, model.ready"
        f" (downloaded, verified) at {median(loopback.phases['model.ready']):.2f} s; both plain"
        f" downloads at once take {median(loopback.together):.2f} s with"
        f" {server_cores + client_cores:.2f} of {os.cpu_count()} cores busy (S3 server"
        f" {server_cores:.2f}, downloader {client_cores:.2f}). At {link_mb_s} MB/s per"
        f" connection (bench.shaping's proxy): images.ready at"
        f" {median(paced.phases['images.ready']):.2f} s, model.ready at"
        f" {median(paced.phases['model.ready']):.2f} s, both plain downloads at once"
        f" {median(paced.together):.2f} s",
    )
