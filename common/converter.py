"""The one data converter every client and worker uses: pydantic JSON, then AES-256-GCM."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

from .settings import Settings

ENCODING = b"binary/encrypted"


class CodecKeyError(ValueError):
    pass


def load_codec_key(encoded: str) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise CodecKeyError("LORA_CODEC_KEY must be base64 of 32 random bytes") from None
    if len(key) != 32:
        raise CodecKeyError(f"LORA_CODEC_KEY must decode to 32 bytes, not {len(key)}")
    return key


def new_codec_key() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")


class EncryptionCodec(PayloadCodec):
    """Encrypts every payload, so secrets in requests never reach Temporal history in plain text."""

    def __init__(self, key: bytes, key_id: str = "k1") -> None:
        self._aead = AESGCM(key)
        self._key_id = key_id.encode()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [
            Payload(
                metadata={"encoding": ENCODING, "encryption-key-id": self._key_id},
                data=self._encrypt(p.SerializeToString()),
            )
            for p in payloads
        ]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        decoded: list[Payload] = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                decoded.append(p)
                continue
            key_id = p.metadata.get("encryption-key-id")
            if key_id != self._key_id:
                raise ValueError(f"payload encrypted with unknown key id {key_id!r}")
            decoded.append(Payload.FromString(self._decrypt(p.data)))
        return decoded

    def _encrypt(self, data: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, None)

    def _decrypt(self, data: bytes) -> bytes:
        return self._aead.decrypt(data[:12], data[12:], None)


def codec_from_settings(settings: Settings) -> EncryptionCodec:
    if settings.codec_key is None:
        raise CodecKeyError("LORA_CODEC_KEY is not set (base64 of 32 random bytes)")
    return EncryptionCodec(
        load_codec_key(settings.codec_key.get_secret_value()), settings.codec_key_id
    )


def data_converter(settings: Settings) -> DataConverter:
    """Pydantic payloads and failure messages, encrypted with the settings' codec key."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec_from_settings(settings),
        # Error messages can quote user input; keep them out of history in plain text too.
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
