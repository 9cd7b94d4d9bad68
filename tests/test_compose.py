"""docker-compose.yml and the top-level Dockerfile, checked without Docker.

The stack is not started here (no Docker engine in CI); these tests hold the file to what the
design promises: loopback-only defaults, the documented ports, settings that the code knows, a
codec endpoint the browser can reach, pinned images. With a Compose v2 binary on PATH, Compose
itself validates the file too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import SecretStr
from starlette.routing import Mount

from cli.app import app as cli_app
from common.converter import new_codec_key
from common.settings import Settings
from relay.app import create_app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

LOOPBACK = "127.0.0.1"
# DESIGN.md, docker-compose.yml: the default host ports.
DEFAULT_PORTS = {"temporal": 7233, "temporal-ui": 8233, "minio": 9000, "relay": 8088}
APP_SERVICES = ("worker", "relay")

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
_LORA_NAME = re.compile(r"\bLORA_[A-Z0-9_]+")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict) and isinstance(loaded.get("services"), dict)
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def with_defaults(value: str, required: str | None = None) -> str:
    """`value` as Compose interpolates it when the host sets none of its variables.

    A required variable (`${NAME:?message}`) becomes `required`; without one it is an error.
    """

    def resolve(match: re.Match[str]) -> str:
        op = match["op"] or ""
        if "-" in op:
            return match["arg"]
        if "?" in op and required is not None:
            return required
        raise AssertionError(f"{match[0]} has no default in {value!r}")

    return _VARIABLE.sub(resolve, value.replace("$$", "\0")).replace("\0", "$")


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(raw host address, host address with defaults, host port with defaults) per port."""
    ports = []
    for entry in service.get("ports", []):
        assert isinstance(entry, str), f"use the short syntax HOST_IP:HOST_PORT:PORT, not {entry!r}"
        raw_host, raw_port, _container_port = _split_port(entry)
        ports.append((raw_host, with_defaults(raw_host), int(with_defaults(raw_port))))
    return ports


def _split_port(entry: str) -> tuple[str, str, str]:
    # Split on the colons outside ${...}: defaults may not contain any, but keep it robust.
    parts, depth, current = [], 0, ""
    for char in entry:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    assert len(parts) == 3, f"port {entry!r} must name its host address: HOST_IP:HOST_PORT:PORT"
    return parts[0], parts[1], parts[2]


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of `environment`"
    return {str(k): None if v is None else str(v) for k, v in env.items()}


def default_host_port(compose: dict[str, Any], name: str) -> int:
    ports = published_ports(services(compose)[name])
    assert ports, f"service {name} publishes no port"
    return ports[0][2]


# ------------------------------------------------------------------------------------------------


def test_every_published_port_binds_to_loopback_by_default(compose: dict[str, Any]) -> None:
    seen = 0
    for name, service in services(compose).items():
        for raw_host, host, port in published_ports(service):
            seen += 1
            assert host == LOOPBACK, f"{name} publishes port {port} on {host!r}, not {LOOPBACK}"
            assert _VARIABLE.fullmatch(raw_host), (
                f"{name}: the address of port {port} should be overridable, "
                f"like ${{SOMETHING_BIND:-{LOOPBACK}}}"
            )
    assert seen >= len(DEFAULT_PORTS)


def test_the_designs_default_ports_are_published(compose: dict[str, Any]) -> None:
    for name, port in DEFAULT_PORTS.items():
        assert port in {p for _, _, p in published_ports(services(compose)[name])}, (
            f"{name} should be published on {LOOPBACK}:{port}"
        )


def test_worker_and_relay_get_temporal_and_required_secrets(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        env = environment(services(compose)[name])
        assert env.get("LORA_TEMPORAL_ADDRESS") == "temporal:7233", name
        for secret in ("LORA_CODEC_KEY", "LORA_WEBHOOK_MASTER_SECRET"):
            value = env.get(secret) or ""
            match = _VARIABLE.fullmatch(value)
            assert match and match["name"] == secret and match["op"] == ":?", (
                f"{name}: {secret} must be required from the host, ${{{secret}:?message}}, "
                f"not {value!r}"
            )
    relay_env = environment(services(compose)["relay"])
    assert relay_env.get("LORA_RELAY_HOST") == "0.0.0.0", "the relay must listen beyond loopback"
    assert environment(services(compose)["worker"]).get("LORA_S3_ENDPOINT_URL") == (
        "http://minio:9000"
    )


def test_every_lora_variable_is_a_setting() -> None:
    known = {f"LORA_{field.upper()}" for field in Settings.model_fields}
    named = set(_LORA_NAME.findall(COMPOSE_FILE.read_text()))
    assert named, "docker-compose.yml names no LORA_ setting"
    assert not named - known, (
        f"not fields of common.settings.Settings: {sorted(named - known)} "
        "(compose-only knobs use another prefix)"
    )


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_environment_is_valid_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("LORA_")]:
        monkeypatch.delenv(key)
    env = environment(services(compose)[name])
    for key, value in env.items():
        if value is not None:  # None: passed through from the host only when set there
            monkeypatch.setenv(key, with_defaults(value, required="set-on-the-host"))
    settings = Settings(_env_file=None)
    assert settings.temporal_address == "temporal:7233"
    if name == "relay":
        assert settings.relay_host == "0.0.0.0"
        assert settings.relay_port == 8088


def test_ui_codec_endpoint_is_the_relays_published_codec_server(compose: dict[str, Any]) -> None:
    ui_env = environment(services(compose)["temporal-ui"])
    endpoint = urlsplit(with_defaults(ui_env.get("TEMPORAL_CODEC_ENDPOINT") or ""))
    assert endpoint.scheme == "http"
    # The browser calls it: the relay's host address and port, not the service name.
    relay_host = published_ports(services(compose)["relay"])[0][1]
    assert endpoint.hostname == relay_host
    assert endpoint.port == default_host_port(compose, "relay")

    settings = Settings(
        _env_file=None,
        codec_key=SecretStr(new_codec_key()),
        webhook_master_secret=SecretStr("compose-test"),
    )
    mounts = {r.path for r in create_app(settings).routes if isinstance(r, Mount)}
    assert endpoint.path in mounts, f"the relay serves its codec under {sorted(mounts)}"

    # The relay must let the UI's origin call the codec server (CORS), or decoding fails.
    relay_env = environment(services(compose)["relay"])
    origins = json.loads(with_defaults(relay_env.get("LORA_CODEC_CORS_ORIGINS") or "[]"))
    ui_origin = f"http://{LOOPBACK}:{default_host_port(compose, 'temporal-ui')}"
    assert ui_origin in origins


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        image = with_defaults(service.get("image", ""))
        assert image or "build" in service, f"{name} has neither image nor build"
        if image:
            _, _, tag = image.rpartition("/")[2].partition(":")
            assert tag and tag != "latest", f"{name}: pin {image!r} to a version tag"
    for line in DOCKERFILE.read_text().splitlines():
        if line.upper().startswith("FROM "):
            image = line.split()[1]
            assert ":" in image and not image.endswith(":latest"), f"pin {image!r}"


def test_worker_and_relay_run_the_loratrain_commands(compose: dict[str, Any]) -> None:
    commands = {
        c.name or (c.callback.__name__ if c.callback else "") for c in cli_app.registered_commands
    }
    for name in APP_SERVICES:
        service = services(compose)[name]
        assert service.get("build"), f"{name} is built from the top-level Dockerfile"
        assert service.get("command") == [name] and name in commands


def test_dockerfile_installs_the_project_with_entrypoint_loratrain() -> None:
    lines = _dockerfile_instructions()
    runs = [arg for op, arg in lines if op == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in runs), (
        "the image should `pip install .` (the project, no test extras)"
    )
    assert not any("[test" in run or "[dev" in run for run in runs)
    entrypoint = [json.loads(arg) for op, arg in lines if op == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["loratrain"]
    users = [arg for op, arg in lines if op == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image should run as a non-root user"

    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", ".loratrain", "tests", ".git"} <= ignored


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, arg = line.partition(" ")
            pairs.append((op.upper(), arg.strip()))
    return pairs
