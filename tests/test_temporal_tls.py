"""Temporal over TLS, as Temporal Cloud and clusters with TLS on serve it: a TLS-terminating
proxy (certificates from a CA made here) in front of the dev server, and `connect_client` with
the LORA_TEMPORAL_TLS_* settings and the API key going through it, or refused by it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr, ValidationError
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from common.converter import new_codec_key
from common.settings import Settings
from common.temporal import connect_client

from .test_cli import loratrain
from .test_cli_runs import errors

# The name the proxy's certificate carries, as a real server's does; the tests dial 127.0.0.1.
SERVER_NAME = "temporal.test"
API_KEY = "test-temporal-api-key-not-for-logs"


@dataclass
class Pki:
    """PEM files: a CA, the server's certificate and key, a client's certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(
        "loratrain test CA", ca_key, None, [(x509.BasicConstraints(ca=True, path_length=0), True)]
    )
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        SERVER_NAME,
        server_key,
        (ca.subject, ca_key),
        [
            *leaf,
            (x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        "loratrain worker",
        client_key,
        (ca.subject, ca_key),
        [*leaf, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=folder / "ca.pem",
        server_cert=_write(folder / "server.pem", server, server_key),
        server_key=folder / "server.key",
        client_cert=_write(folder / "client.pem", client, client_key),
        client_key=folder / "client.key",
    )


@contextlib.asynccontextmanager
async def tls_proxy(
    upstream: str, pki: Pki, require_client_cert: bool = False
) -> AsyncIterator[str]:
    """A TLS listener on a free loopback port that pipes each connection to `upstream` in plain
    TCP; yields its address. gRPC over TLS needs ALPN to agree on h2."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.set_alpn_protocols(["h2"])
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    host, port = upstream.rsplit(":", 1)
    writers: set[asyncio.StreamWriter] = set()

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writers.update((writer, up_writer))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()


@pytest.fixture
async def proxy(dev_env: WorkflowEnvironment, pki: Pki) -> AsyncIterator[str]:
    async with tls_proxy(dev_env.client.service_client.config.target_host, pki) as address:
        yield address


def tls_settings(address: str, **values: Any) -> Settings:
    return Settings(temporal_address=address, codec_key=SecretStr(new_codec_key()), **values)


async def namespace_name(client: Client) -> str:
    """Temporal answering a call over the connection: the namespace as it describes itself."""
    described = await client.workflow_service.describe_namespace(
        DescribeNamespaceRequest(namespace=client.namespace)
    )
    return described.namespace_info.name


async def test_tls_with_the_servers_ca_reaches_temporal_through_the_proxy(
    proxy: str, pki: Pki
) -> None:
    settings = tls_settings(
        proxy,
        temporal_tls=True,
        temporal_tls_ca_path=pki.ca,
        temporal_tls_server_name=SERVER_NAME,
    )

    client = await connect_client(settings)

    assert await namespace_name(client) == "default"


async def test_the_server_certificate_is_refused_without_its_ca_or_under_another_name(
    proxy: str, pki: Pki
) -> None:
    # The system's roots do not know the test CA.
    unknown_ca = tls_settings(proxy, temporal_tls=True, temporal_tls_server_name=SERVER_NAME)
    with pytest.raises(RuntimeError, match=r"InvalidCertificate\(UnknownIssuer\)"):
        await connect_client(unknown_ca)

    # The certificate names temporal.test, not the address dialled.
    wrong_name = tls_settings(proxy, temporal_tls=True, temporal_tls_ca_path=pki.ca)
    with pytest.raises(RuntimeError, match=r"InvalidCertificate\(NotValidForName"):
        await connect_client(wrong_name)


async def test_plain_grpc_does_not_reach_a_tls_server(proxy: str) -> None:
    """Without any TLS setting the connection stays plain, which a TLS server refuses."""
    with pytest.raises(RuntimeError):
        await connect_client(tls_settings(proxy))


async def test_an_api_key_turns_tls_on_and_the_client_carries_it(
    proxy: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = tls_settings(
        proxy,
        temporal_api_key=SecretStr(API_KEY),
        temporal_tls_ca_path=pki.ca,
        temporal_tls_server_name=SERVER_NAME,
    )
    assert settings.temporal_tls is False

    # Only a TLS client gets an answer from the proxy: TLS is on.
    client = await connect_client(settings)

    assert await namespace_name(client) == "default"
    assert client.api_key == API_KEY
    assert API_KEY not in repr(settings) + str(settings) + caplog.text


async def test_a_client_certificate_is_presented_where_the_server_requires_one(
    dev_env: WorkflowEnvironment, pki: Pki
) -> None:
    upstream = dev_env.client.service_client.config.target_host
    async with tls_proxy(upstream, pki, require_client_cert=True) as address:
        server_only = dict(temporal_tls_ca_path=pki.ca, temporal_tls_server_name=SERVER_NAME)
        mtls = tls_settings(
            address,
            temporal_tls_cert_path=pki.client_cert,
            temporal_tls_key_path=pki.client_key,
            **server_only,
        )

        assert await namespace_name(await connect_client(mtls)) == "default"

        # TLS 1.3 refuses a missing client certificate just after the handshake: the connect's
        # first call finds the connection closed.
        with pytest.raises(RuntimeError, match="transport error"):
            await connect_client(tls_settings(address, **server_only))


def test_a_missing_tls_file_is_refused_in_one_line_naming_the_setting(
    tmp_path: Path, pki: Pki
) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"

    with pytest.raises(ValidationError) as refused:
        Settings(temporal_tls_ca_path=missing)
    assert [e["msg"] for e in refused.value.errors()] == [
        f"cannot read {missing} (No such file or directory)"
    ]

    # A file that is not PEM (a DER certificate, say) is refused as well.
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValidationError, match="is not a PEM file"):
        Settings(temporal_tls_ca_path=der)

    # A certificate without its key is half of mTLS.
    with pytest.raises(ValidationError, match="mTLS needs both"):
        Settings(temporal_tls_cert_path=pki.client_cert)


async def test_a_tls_file_gone_since_the_settings_were_made_is_named_by_connect_client(
    tmp_path: Path, pki: Pki
) -> None:
    gone = tmp_path / "ca.pem"
    settings = tls_settings("127.0.0.1:1").model_copy(update={"temporal_tls_ca_path": gone})

    with pytest.raises(ValueError) as refused:
        await connect_client(settings)

    assert str(refused.value) == (
        f"LORA_TEMPORAL_TLS_CA_PATH: cannot read {gone} (No such file or directory)"
    )


def test_the_cli_names_the_setting_and_the_path_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "client.pem"

    result = loratrain(
        ["status", "some-run"],
        tmp_path,
        {"LORA_TEMPORAL_TLS_CERT_PATH": str(missing), "LORA_TEMPORAL_TLS_KEY_PATH": str(missing)},
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert errors(result.stderr) == [
        f"LORA_TEMPORAL_TLS_CERT_PATH: cannot read {missing} (No such file or directory)",
        f"LORA_TEMPORAL_TLS_KEY_PATH: cannot read {missing} (No such file or directory)",
    ]
