"""Memory and speed of `build_images_zip`: peak memory must not grow with the dataset.

Starts the embedded stack's S3 server (SeaweedFS) on free loopback ports, uploads datasets of
random "images" (a tiny PNG + random bytes, which do not compress), then zips each one in a
fresh child process and reports wall time, throughput and how far the child's peak RSS (VmHWM)
rose above its RSS just before the call. Run from the repository root:

    .venv/bin/python -m bench.zip_memory              # 100 MB and 300 MB of 1 MB files
    .venv/bin/python -m bench.zip_memory --sizes 50,500 --file-mb 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from PIL import Image

from bench.common import Row
from devstack.stack import local_s3_server

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench"
MB = 1024 * 1024


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 200)).save(buffer, "PNG")
    return buffer.getvalue()


# Intake decodes every image: each "image" is a real PNG followed by random bytes, which
# decoders ignore and which do not compress.
PNG_PREFIX = _tiny_png()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300", help="dataset sizes in MB, comma separated")
    parser.add_argument("--file-mb", type=float, default=1.0, help="size of each image, MB")
    parser.add_argument("--child", nargs=3, metavar=("ENDPOINT", "PREFIX", "RUN_ID"))
    parser.add_argument("--copy-child", nargs=2, metavar=("ENDPOINT", "PREFIX"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(zip_in_this_process(*args.child)))
        return
    if args.copy_child:
        print(json.dumps(copy_in_this_process(*args.copy_child)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    file_bytes = int(args.file_mb * MB)
    with local_s3() as endpoint:
        s3 = client(endpoint)
        for size in sizes:
            count = size * MB // file_bytes
            started = time.monotonic()
            upload_dataset(s3, f"datasets/{size}mb", count, file_bytes)
            print(
                f"uploaded {count} x {file_bytes / MB:g} MB in {time.monotonic() - started:.1f} s",
                file=sys.stderr,
            )
        print(
            f"{'dataset':>10} {'files':>6} {'zip MB':>8} {'wall s':>7} {'MB/s':>7} "
            f"{'RSS before MB':>14} {'peak RSS rise MB':>17}"
        )
        for size in sizes:
            child = subprocess.run(
                [sys.executable, "-m", "bench.zip_memory", "--child", endpoint,
                 f"datasets/{size}mb", f"bench-{size}"],
                cwd=ROOT, capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(child.stdout)
            print(
                f"{size:>7} MB {r['image_count']:>6} {r['zip_bytes'] / MB:>8.1f} "
                f"{r['wall_s']:>7.2f} {r['zip_bytes'] / MB / r['wall_s']:>7.1f} "
                f"{r['rss_before'] / MB:>14.1f} {(r['peak_rss'] - r['rss_before']) / MB:>17.1f}"
            )


def zip_in_this_process(endpoint: str, prefix: str, run_id: str) -> dict[str, Any]:
    """Run build_images_zip once; report time and memory. Runs in a fresh child process, set
    up for memory as the worker process is."""
    from pydantic import SecretStr

    from activities.storage import DatasetInput, StorageActivities
    from common.settings import Settings
    from worker.memory import return_large_buffers_to_the_os
    from workflows.models import S3Prefix

    return_large_buffers_to_the_os()

    settings = Settings(
        s3_endpoint_url=endpoint,
        s3_access_key_id="bench",
        s3_secret_access_key=SecretStr("bench"),
        bucket=BUCKET,
    )
    s3 = client(endpoint)
    s3.list_objects_v2(Bucket=BUCKET, MaxKeys=1)  # connect before measuring
    acts = StorageActivities(s3, settings)
    rss_before = proc_status_bytes("VmRSS")
    started = time.monotonic()
    result = acts.build_images_zip(
        DatasetInput(run_id=run_id, images=S3Prefix(bucket=BUCKET, prefix=prefix))
    )
    wall_s = time.monotonic() - started
    return {
        "image_count": result.image_count,
        "zip_bytes": result.bytes,
        "wall_s": wall_s,
        "rss_before": rss_before,
        "peak_rss": proc_status_bytes("VmHWM"),  # the kernel's exact high-water mark
    }


def copy_in_this_process(endpoint: str, prefix: str) -> dict[str, Any]:
    """The baseline: copy every object of the dataset through this client (GET, then PUT under
    copies/), one after the other as the zip reads them. Runs in a fresh child process."""
    s3 = client(endpoint)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    rss_before = proc_status_bytes("VmRSS")
    started = time.monotonic()
    copied = 0
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        s3.put_object(Bucket=BUCKET, Key=f"copies/{key}", Body=body)
        copied += len(body)
    return {
        "bytes": copied,
        "wall_s": time.monotonic() - started,
        "rss_before": rss_before,
        "peak_rss": proc_status_bytes("VmHWM"),
    }


def _child(*args: str) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, "-m", "bench.zip_memory", *args],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if child.returncode != 0:
        raise RuntimeError(f"bench.zip_memory {args[0]} failed: {child.stderr[-1500:]}")
    result: dict[str, Any] = json.loads(child.stdout)
    return result


def p4_zip_throughput(sizes_mb: tuple[int, ...] = (100, 1024)) -> Row:
    """Zip throughput and peak RSS rise per dataset size, against a plain copy of the objects."""
    figures, baselines, ratios, rss_rises = [], [], [], []
    with local_s3() as endpoint:
        s3 = client(endpoint)
        for size in sizes_mb:
            prefix = f"datasets/{size}mb"
            # Datasets hold at most 1,000 images (the default limit): bigger sets, bigger images.
            file_mb = -(-size // 900)
            upload_dataset(s3, prefix, size // file_mb, file_mb * MB)
            zipped = _child("--child", endpoint, prefix, f"bench-{size}")
            copied = _child("--copy-child", endpoint, prefix)
            zip_rate = zipped["zip_bytes"] / MB / zipped["wall_s"]
            copy_rate = copied["bytes"] / MB / copied["wall_s"]
            rise = (zipped["peak_rss"] - zipped["rss_before"]) / MB
            rss_rises.append(rise)
            ratios.append(zip_rate / copy_rate)
            label = f"{size / 1024:g} GB" if size >= 1024 else f"{size} MB"
            figures.append(f"{label}: {zip_rate:.0f} MB/s, RSS +{rise:.0f} MB")
            baselines.append(f"{label}: {copy_rate:.0f} MB/s")
    return Row(
        "P4",
        "images zip: throughput and peak RSS rise (images of 1 MB below 900 MB, 2 MB to 1.8 GB)",
        "; ".join(figures),
        "S3 -> S3 copy " + "; ".join(baselines),
        " / ".join(f"{r:.2f} x" for r in ratios),
        ">= 1.0 x, RSS rise <= 50 MB",
        min(ratios) >= 1.0 and max(rss_rises) <= 50,
        "zip = list and check names and sizes, then read each file once (8 GETs, 8 MB ahead),"
        " check its contents (decode) and stream it into one multipart upload (8 MB parts, two"
        " uploading while the next fills), then the"
        " metadata self-copy; copy = GET + PUT of each object, one at a time; both in a fresh"
        " child process (the zip's set up for memory as the worker is)",
    )


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def upload_dataset(s3: Any, prefix: str, count: int, file_bytes: int) -> None:
    def put(i: int) -> None:
        body = PNG_PREFIX + os.urandom(file_bytes - len(PNG_PREFIX))
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{i:05d}.png", Body=body)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


def client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """The embedded stack's S3 server (SeaweedFS) on free loopback ports, its data in a
    temporary directory; stopped and removed on exit."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-s3-") as data,
        local_s3_server(
            Path(data) / "s3",
            access_key_id="bench",
            secret_access_key="bench",
            bucket=BUCKET,
            stop_grace_s=0,
        ) as endpoint,
    ):
        yield endpoint


if __name__ == "__main__":
    main()
