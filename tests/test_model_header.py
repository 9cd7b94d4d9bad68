"""Telling checkpoints apart from their safetensors header alone.

Every file here has the real key names of the layouts people download, with tiny tensors except
for the few whose shapes the detector reads; the data is a sparse run of zeros, so each file is a
valid safetensors file of its true length without weights on disk.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from activities.model_header import (
    MAX_HEADER_BYTES,
    Detected,
    Header,
    HeaderError,
    component_role,
    describe_mismatch,
    detect,
    header_length,
    parse_header,
    read_header_http,
    read_header_local,
    read_header_s3,
)
from common.settings import Settings

from .http_support import serve_asgi

Tensors = dict[str, tuple[str, tuple[int, ...]]]

_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1, "I64": 8}
_TINY: tuple[int, ...] = (1,)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"


def header_bytes(tensors: Tensors, metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """The 8 + N bytes of a safetensors header for `tensors`, and the length of their data."""
    entries: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * _DTYPE_BYTES[dtype]
        entries[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata is not None:
        entries["__metadata__"] = metadata
    raw = json.dumps(entries).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors writers pad the header to 8 bytes
    return len(raw).to_bytes(8, "little") + raw, offset


def write_safetensors(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> Path:
    prefix, data_bytes = header_bytes(tensors, metadata)
    with path.open("wb") as f:
        f.write(prefix)
        f.truncate(len(prefix) + data_bytes)  # zeros, sparse on disk
    return path


def header_of(tensors: Tensors, metadata: dict[str, str] | None = None) -> Header:
    return parse_header(header_bytes(tensors, metadata)[0])


def tiny(*names: str, dtype: str = "F16") -> Tensors:
    return {name: (dtype, _TINY) for name in names}


# --------------------------------------------------------------------------------------------
# Real layouts
# --------------------------------------------------------------------------------------------

U = "model.diffusion_model."


def sd15() -> Tensors:
    return {
        **tiny(
            U + "input_blocks.0.0.weight",
            U + "time_embed.0.weight",
            U + "out.2.weight",
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "first_stage_model.decoder.conv_in.weight",
            "first_stage_model.encoder.down.0.block.0.conv1.weight",
        ),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", (320, 768)),
    }


def sd2() -> Tensors:
    return {
        **tiny(
            U + "input_blocks.0.0.weight",
            U + "out.2.weight",
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
            "cond_stage_model.model.ln_final.weight",
            "first_stage_model.decoder.conv_in.weight",
        ),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", (320, 1024)),
    }


def sdxl() -> Tensors:
    return {
        **tiny(
            U + "input_blocks.0.0.weight",
            U + "label_emb.0.0.weight",
            U + "out.2.weight",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection",
            "first_stage_model.decoder.conv_in.weight",
        ),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": ("F16", (640, 2048)),
    }


def flux_transformer(prefix: str = "", *, dev: bool = True) -> Tensors:
    names = [
        "img_in.weight",
        "txt_in.weight",
        "time_in.in_layer.weight",
        "vector_in.in_layer.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.proj.bias",
        "double_blocks.18.img_attn.proj.bias",
        "single_blocks.0.modulation.lin.bias",
        "single_blocks.37.modulation.lin.bias",
        "final_layer.linear.weight",
    ]
    if dev:
        names += ["guidance_in.in_layer.weight", "guidance_in.out_layer.weight"]
    return tiny(*(prefix + name for name in names), dtype="BF16")


def flux_diffusers(*, dev: bool) -> Tensors:
    names = [
        "x_embedder.weight",
        "context_embedder.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn.add_k_proj.weight",
        "transformer_blocks.0.attn.add_k_proj.bias",
        "single_transformer_blocks.0.attn.to_k.bias",
        "time_text_embed.timestep_embedder.linear_1.weight",
    ]
    if dev:
        names.append("time_text_embed.guidance_embedder.linear_1.weight")
    return tiny(*names, dtype="BF16")


def chroma() -> Tensors:
    return tiny(
        "img_in.weight",
        "txt_in.weight",
        "distilled_guidance_layer.in_proj.weight",
        "distilled_guidance_layer.layers.0.in_layer.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear1.weight",
        dtype="BF16",
    )


def text_encoders_inside(*roles: str) -> Tensors:
    names = {
        "clip_l": "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
        "clip_g": "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight",
        "t5xxl": "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight",
    }
    return tiny(*(names[role] for role in roles))


def sd3(depth: int, *, mmdit_x: bool) -> Tensors:
    names = [U + "x_embedder.proj.weight", U + "pos_embed", U + "context_embedder.weight"]
    for i in range(depth):
        block = f"{U}joint_blocks.{i}."
        names += [block + "x_block.attn.qkv.weight", block + "context_block.attn.qkv.weight"]
        if mmdit_x and i <= 12:
            names.append(block + "x_block.attn2.qkv.weight")
    return tiny(*names)


def clip_l_file() -> Tensors:
    return {
        **tiny(
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.0.self_attn.k_proj.weight",
            "text_model.encoder.layers.11.self_attn.k_proj.weight",
        ),
        "text_model.final_layer_norm.weight": ("F16", (768,)),
    }


def clip_g_file() -> Tensors:
    return {
        **tiny(
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.31.self_attn.k_proj.weight",
            "text_projection.weight",
        ),
        "text_model.final_layer_norm.weight": ("F16", (1280,)),
    }


def t5xxl_file() -> Tensors:
    return {
        **tiny(
            "shared.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.23.layer.1.DenseReluDense.wo.weight",
        ),
        "encoder.final_layer_norm.weight": ("F16", (4096,)),
    }


def vae_file(latent_channels: int) -> Tensors:
    return {
        **tiny(
            "encoder.conv_in.weight",
            "decoder.mid.block_1.conv1.weight",
            "decoder.up.0.block.0.conv1.weight",
        ),
        "decoder.conv_in.weight": ("F16", (512, latent_channels, 3, 3)),
        "encoder.conv_out.weight": ("F16", (2 * latent_channels, 512, 3, 3)),
    }


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


def test_sd15_from_its_context_width() -> None:
    found = detect(header_of(sd15()))
    assert (found.family, found.architecture, found.variant) == ("sd15", "SD 1.x", None)
    assert not found.v_parameterization
    assert found.missing() == ()


def test_sd2_without_metadata_is_not_assumed_v() -> None:
    found = detect(header_of(sd2()))
    assert (found.family, found.architecture) == ("sd2", "SD 2.x")
    assert found.v_parameterization is False


@pytest.mark.parametrize(
    "metadata",
    [
        {"modelspec.prediction_type": "v"},
        {"modelspec.architecture": "stable-diffusion-v2-768-v"},
        {"modelspec.architecture": "stable-diffusion-v2/v-prediction"},
    ],
)
def test_sd2_v_prediction_from_modelspec(metadata: dict[str, str]) -> None:
    found = detect(header_of(sd2(), metadata))
    assert (found.family, found.v_parameterization) == ("sd2", True)


def test_sd2_512_modelspec_is_epsilon() -> None:
    metadata = {"modelspec.architecture": "stable-diffusion-v2-512"}
    metadata["modelspec.prediction_type"] = "epsilon"
    assert detect(header_of(sd2(), metadata)).v_parameterization is False


def test_sdxl_holds_its_text_encoders_and_vae() -> None:
    found = detect(header_of(sdxl()))
    assert (found.family, found.architecture) == ("sdxl", "SDXL")
    assert found.holds == {"clip_l", "clip_g", "ae"}
    assert not found.v_parameterization


def test_sdxl_v_pred_marker_tensor() -> None:
    found = detect(header_of({**sdxl(), "v_pred": ("F32", (0,))}))
    assert (found.family, found.v_parameterization) == ("sdxl", True)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_dev_transformer_needs_its_components(prefix: str) -> None:
    found = detect(header_of(flux_transformer(prefix)))
    assert (found.family, found.architecture, found.variant) == ("flux", "Flux.1 dev", "dev")
    assert found.holds == frozenset()
    assert found.missing() == ("clip_l", "t5xxl", "ae")


def test_flux_schnell_has_no_guidance_embedding() -> None:
    found = detect(header_of(flux_transformer(dev=False)))
    assert (found.architecture, found.variant) == ("Flux.1 schnell", "schnell")


def test_flux_full_checkpoint_holds_text_encoders_and_ae_and_still_needs_them_beside_it() -> None:
    tensors = {
        **flux_transformer("model.diffusion_model."),
        **text_encoders_inside("clip_l", "t5xxl"),
        **tiny("vae.decoder.conv_in.weight", "vae.encoder.conv_out.weight"),
    }
    found = detect(header_of(tensors))
    assert found.family == "flux"
    assert found.holds == {"clip_l", "t5xxl", "ae"}
    # flux_train_network.py loads them only from --clip_l/--t5xxl/--ae.
    assert found.missing() == ("clip_l", "t5xxl", "ae")


@pytest.mark.parametrize(("dev", "variant"), [(True, "dev"), (False, "schnell")])
def test_flux_diffusers_layout(dev: bool, variant: str) -> None:
    found = detect(header_of(flux_diffusers(dev=dev)))
    assert (found.family, found.variant) == ("flux", variant)


def test_chroma_is_flux_like_but_not_flux() -> None:
    found = detect(header_of(chroma()))
    assert (found.family, found.architecture) == ("other", "Chroma")


def test_sd35_large_with_text_encoders_inside_misses_nothing() -> None:
    tensors = {
        **sd3(38, mmdit_x=False),
        **text_encoders_inside("clip_l", "clip_g", "t5xxl"),
        **tiny("first_stage_model.decoder.conv_in.weight"),
    }
    found = detect(header_of(tensors))
    assert (found.family, found.architecture, found.variant) == ("sd3", "SD 3.5 large", "large")
    assert found.holds == {"clip_l", "clip_g", "t5xxl", "ae"}
    assert found.missing() == ()


def test_sd35_medium_is_mmdit_x_and_without_encoders_misses_them() -> None:
    found = detect(header_of(sd3(24, mmdit_x=True)))
    assert (found.family, found.architecture, found.variant) == ("sd3", "SD 3.5 medium", "medium")
    assert found.missing() == ("clip_l", "clip_g", "t5xxl")


def test_sd3_medium_has_no_second_attention() -> None:
    tensors = {**sd3(24, mmdit_x=False), **text_encoders_inside("clip_l", "clip_g")}
    found = detect(header_of(tensors))
    assert (found.family, found.architecture, found.variant) == ("sd3", "SD 3 medium", "medium")
    assert found.missing() == ("t5xxl",)


@pytest.mark.parametrize(
    ("tensors", "architecture"),
    [
        (
            tiny("model.double_layers.0.attn.w1q.weight", "model.single_layers.0.attn.w1q.weight")
            | tiny("model.register_tokens", "model.cond_seq_linear.weight"),
            "AuraFlow",
        ),
        (
            tiny(
                "joint_transformer_blocks.0.attn.to_q.weight",
                "single_transformer_blocks.0.attn.to_q.weight",
                "register_tokens",
            ),
            "AuraFlow",
        ),
        (
            tiny(
                U + "cap_embedder.1.weight",
                U + "noise_refiner.0.attention.qkv.weight",
                U + "layers.0.attention.qkv.weight",
            ),
            "Lumina",
        ),
        (
            tiny("img_in.weight", "txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"),
            "Qwen-Image",
        ),
        (tiny("double_stream_blocks.0.block.attn1.to_q.weight"), "HiDream"),
        (
            {
                **sdxl(),
                U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": ("F16", (640, 1280)),
            },
            "SDXL refiner",
        ),
        (
            {**sd2(), **tiny(U + "label_emb.0.0.weight")},
            "SD 2.1 unCLIP",
        ),
    ],
    ids=[
        "auraflow",
        "auraflow-diffusers",
        "lumina",
        "qwen-image",
        "hidream",
        "sdxl-refiner",
        "unclip",
    ],
)
def test_unsupported_architectures_are_named(tensors: Tensors, architecture: str) -> None:
    found = detect(header_of(tensors))
    assert (found.family, found.architecture) == ("other", architecture)
    assert found.missing() == ()


@pytest.mark.parametrize(
    "tensors",
    [
        tiny(
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight",
            "lora_unet_input_blocks_4_1_proj_in.alpha",
        ),
        # A Flux LoRA in PEFT layout names Flux modules: it must not pass for Flux.
        tiny(
            "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight",
            "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight",
            "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight",
        ),
        tiny("diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"),
    ],
    ids=["kohya", "peft-flux", "comfy-flux"],
)
def test_lora_is_not_a_base_model(tensors: Tensors) -> None:
    found = detect(header_of(tensors, {"ss_network_module": "networks.lora"}))
    assert (found.family, found.architecture) == ("other", "a LoRA, not a base model")


# --------------------------------------------------------------------------------------------
# Component files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "role", "architecture"),
    [
        (clip_l_file(), "clip_l", "a text encoder (CLIP-L)"),
        (clip_g_file(), "clip_g", "a text encoder (CLIP-G)"),
        (t5xxl_file(), "t5xxl", "a text encoder (T5-XXL)"),
        (vae_file(16), "ae", "a VAE (Flux/SD 3 AE)"),
    ],
    ids=["clip_l", "clip_g", "t5xxl", "ae"],
)
def test_component_files(tensors: Tensors, role: str, architecture: str) -> None:
    header = header_of(tensors)
    assert component_role(header) == role
    found = detect(header)
    assert (found.family, found.architecture) == ("other", architecture)
    assert found.holds == frozenset({role})


@pytest.mark.parametrize(
    ("tensors", "architecture"),
    [
        # SD's 4-channel VAE is not the 16-channel AE Flux.1 needs.
        (vae_file(4), "a VAE"),
        # bigG in OpenCLIP layout: sd-scripts' SD 3 loader reads only the transformers layout.
        (
            {
                **tiny("transformer.resblocks.31.attn.in_proj_weight"),
                "ln_final.weight": ("F16", (1280,)),
            },
            "a text encoder (CLIP)",
        ),
        # CLIP-L's width with bigG's depth is neither.
        (
            {**clip_l_file(), **tiny("text_model.encoder.layers.31.self_attn.k_proj.weight")}
            | {"text_model.final_layer_norm.weight": ("F16", (1024,))},
            "a text encoder (CLIP)",
        ),
        # T5 v1.1 base (d_model 768) is not T5-XXL.
        (
            {**t5xxl_file(), "encoder.final_layer_norm.weight": ("F16", (768,))},
            "a text encoder (T5)",
        ),
        (tiny("foo.weight", "bar.bias"), "unknown"),
    ],
    ids=["sd-vae", "openclip-bigg", "odd-clip", "t5-base", "unknown"],
)
def test_files_that_fill_no_role(tensors: Tensors, architecture: str) -> None:
    header = header_of(tensors)
    assert component_role(header) is None
    found = detect(header)
    assert (found.family, found.architecture, found.holds) == ("other", architecture, frozenset())


def test_base_checkpoints_fill_no_component_role() -> None:
    for tensors in (sd15(), sdxl(), flux_transformer(), sd3(38, mmdit_x=False)):
        assert component_role(header_of(tensors)) is None


# --------------------------------------------------------------------------------------------
# Mismatch messages
# --------------------------------------------------------------------------------------------


def test_sdxl_given_as_sd15_names_both() -> None:
    message = describe_mismatch(detect(header_of(sdxl())), "sd15", "model.safetensors")
    assert message is not None and "\n" not in message
    assert message.startswith("model.safetensors is an SDXL checkpoint, not SD 1.x: ")
    assert "SDXL" in message.split(": ", 1)[1]  # says what to set the base model to


def test_agreeing_family_is_no_mismatch() -> None:
    assert describe_mismatch(detect(header_of(sdxl())), "sdxl", "model.safetensors") is None
    found = detect(header_of(flux_transformer(dev=False)))
    assert describe_mismatch(found, "flux", "flux1-schnell.safetensors") is None


@pytest.mark.parametrize(
    ("found", "expected", "wanted"),
    [
        (
            Detected("sd3", "SD 3.5 large", "large", False, frozenset()),
            "flux",
            "m.safetensors is an SD 3.5 large checkpoint, not Flux.1: ",
        ),
        (
            Detected("flux", "Flux.1 dev", "dev", False, frozenset()),
            "sdxl",
            "m.safetensors is a Flux.1 dev checkpoint, not SDXL: ",
        ),
        (
            Detected("other", "AuraFlow", None, False, frozenset()),
            "sdxl",
            "m.safetensors is an AuraFlow checkpoint, not SDXL: no family here trains AuraFlow",
        ),
        (
            Detected("other", "Chroma", None, False, frozenset()),
            "flux",
            "m.safetensors is a Chroma checkpoint, not Flux.1: no family here trains Chroma",
        ),
        (
            Detected("other", "a LoRA, not a base model", None, False, frozenset()),
            "flux",
            "m.safetensors is a LoRA, not a base model: the request needs a Flux.1 checkpoint",
        ),
        (
            Detected("other", "unknown", None, False, frozenset()),
            "sd15",
            "m.safetensors is not an SD 1.x checkpoint: its tensor names match no model",
        ),
        (
            Detected("sdxl", "SDXL", None, False, frozenset()),
            "other",
            "m.safetensors is an SDXL checkpoint, but the request names a base model no family",
        ),
    ],
)
def test_mismatch_messages(found: Detected, expected: Any, wanted: str) -> None:
    message = describe_mismatch(found, expected, "m.safetensors")
    assert message is not None and message.startswith(wanted) and "\n" not in message


# --------------------------------------------------------------------------------------------
# Parsing and its errors
# --------------------------------------------------------------------------------------------


def test_parse_agrees_with_the_safetensors_writer(tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "a.weight": np.zeros((3, 5), dtype=np.float16),
        "b.bias": np.zeros((7,), dtype=np.float32),
        "c.scalar": np.zeros((), dtype=np.int64),
    }
    save_file(arrays, str(path), metadata={"modelspec.architecture": "stable-diffusion-v1"})
    header = read_header_local(path)
    assert header.tensors == {
        "a.weight": ("F16", (3, 5)),
        "b.bias": ("F32", (7,)),
        "c.scalar": ("I64", ()),
    }
    assert header.metadata == {"modelspec.architecture": "stable-diffusion-v1"}


def test_built_files_are_valid_safetensors(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "sd15.safetensors", sd15(), {"k": "v"})
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(sd15())
        assert f.metadata() == {"k": "v"}
        name = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        assert f.get_slice(name).get_shape() == [320, 768]
    assert detect(read_header_local(path)).family == "sd15"


def test_png_is_not_a_safetensors_file(tmp_path: Path) -> None:
    with pytest.raises(HeaderError, match=r"^not a safetensors file: it starts like a PNG image$"):
        parse_header(PNG)
    path = tmp_path / "cat.png"
    path.write_bytes(PNG + bytes(1000))
    with pytest.raises(
        HeaderError, match=r"^cat\.png: not a safetensors file: it starts like a PNG"
    ):
        read_header_local(path)


def test_header_length_over_the_cap() -> None:
    first8 = (MAX_HEADER_BYTES + 1).to_bytes(8, "little")
    with pytest.raises(HeaderError, match="over the 100000000-byte limit") as raised:
        header_length(first8)
    assert "\n" not in str(raised.value)
    assert header_length((1234).to_bytes(8, "little")) == 1234


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        (b"abc", "it is 3 bytes long, shorter than the 8-byte header length"),
        ((0).to_bytes(8, "little"), "too small for any header"),
        ((100).to_bytes(8, "little") + b'{"a": 1}', "truncated safetensors header: it says 100"),
        ((8).to_bytes(8, "little") + b"[1, 2]  ", "no JSON object after the header length"),
        ((8).to_bytes(8, "little") + b'{"a": 1,', "malformed safetensors header: "),
        ((4).to_bytes(8, "little") + b"{\xff\xfe}", "not UTF-8"),
        ((8).to_bytes(8, "little") + b'{"a": 1}', "tensor 'a' lacks a dtype, shape"),
        (header_bytes({}, {"n": 1})[0], "__metadata__ must map strings to strings"),  # type: ignore[dict-item]
        (b"PK\x03\x04\x14\x00\x00\x00", "a ZIP archive (a PyTorch .ckpt/.pt is one"),
        (b"<!DOCTYPE html>", "an HTML or XML page"),
    ],
    ids=[
        "short",
        "zero",
        "truncated",
        "not-object",
        "bad-json",
        "not-utf8",
        "bad-tensor",
        "bad-metadata",
        "zip",
        "html",
    ],
)
def test_malformed_headers(prefix: bytes, problem: str) -> None:
    with pytest.raises(HeaderError) as raised:
        parse_header(prefix)
    assert problem in str(raised.value)
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------------
# S3 (the local SeaweedFS) and HTTP
# --------------------------------------------------------------------------------------------


def test_read_header_s3_asks_for_the_header_bytes_only(
    s3: Any, settings: Settings, tmp_path: Path
) -> None:
    path = write_safetensors(tmp_path / "model.safetensors", sdxl())
    s3.upload_file(str(path), settings.bucket, "models/sdxl.safetensors")
    s3.put_object(Bucket=settings.bucket, Key="models/cat.png", Body=PNG)
    s3.put_object(Bucket=settings.bucket, Key="models/tiny.bin", Body=b"abc")
    ranges: list[str | None] = []

    def record(request: Any, **_: Any) -> None:
        ranges.append(request.headers.get("Range", b"").decode() or None)

    s3.meta.events.register("before-send.s3.GetObject", record)
    header = read_header_s3(s3, settings.bucket, "models/sdxl.safetensors")
    assert detect(header).family == "sdxl"
    length = header_length(path.read_bytes()[:8])
    assert ranges == ["bytes=0-7", f"bytes=8-{7 + length}"]
    assert path.stat().st_size > 8 + length + 2_000_000

    with pytest.raises(HeaderError, match=r"^s3://.*/models/cat\.png: not a safetensors file"):
        read_header_s3(s3, settings.bucket, "models/cat.png")
    with pytest.raises(HeaderError, match=r"tiny\.bin: not a safetensors file: it is 3 bytes"):
        read_header_s3(s3, settings.bucket, "models/tiny.bin")


class _Served:
    """Serves files with and without Range support; records each request's Range, headers and
    the body bytes the server handed to the socket."""

    IGNORED_RANGE_BYTES = 256 * 1024 * 1024

    def __init__(self, model: Path) -> None:
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        routes = [
            Route("/model.safetensors", self.file),
            Route("/redirect", lambda _: RedirectResponse("/model.safetensors", status_code=302)),
            Route("/no-range/model.safetensors", self.ignoring_range),
            Route("/cat.png", lambda _: Response(PNG, media_type="image/png")),
            Route("/missing", lambda _: Response("no such model", status_code=404)),
        ]
        self.app = Starlette(routes=routes)

    async def file(self, _: Request) -> FileResponse:
        return FileResponse(self.model)

    async def ignoring_range(self, _: Request) -> StreamingResponse:
        prefix = self.model.read_bytes()[: 8 + header_length(self.model.read_bytes()[:8])]
        chunk = bytes(64 * 1024)

        async def body() -> AsyncIterator[bytes]:
            yield prefix
            for _ in range(self.IGNORED_RANGE_BYTES // len(chunk)):
                # As a server reading from disk would, give the loop a turn between chunks, so
                # the client's going is noticed.
                await asyncio.sleep(0)
                yield chunk

        size = len(prefix) + self.IGNORED_RANGE_BYTES
        return StreamingResponse(body(), headers={"Content-Length": str(size)})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        record = {"path": scope["path"], "headers": headers, "sent": 0, "done": False}
        with self.lock:
            self.requests.append(record)

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                record["sent"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except (ClientDisconnect, OSError):
            pass  # the client stopped reading, as it should
        finally:
            record["done"] = True

    def wait_done(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while not all(r["done"] for r in self.requests):
            assert time.monotonic() < deadline, "the server never saw the client go"
            time.sleep(0.01)
        return self.requests


@pytest.fixture
def served(tmp_path: Path) -> Any:
    model = write_safetensors(tmp_path / "model.safetensors", sd15())
    return _Served(model)


def test_read_header_http_with_range(served: _Served) -> None:
    length = header_length(served.model.read_bytes()[:8])
    with serve_asgi(served) as base:
        header = read_header_http(
            f"{base}/redirect", headers={"Authorization": "Bearer secret"}, timeout_s=10
        )
    assert detect(header).family == "sd15"
    asked = [r for r in served.wait_done() if r["path"] == "/model.safetensors"]
    assert [r["headers"]["range"] for r in asked] == ["bytes=0-7", f"bytes=8-{7 + length}"]
    assert [r["sent"] for r in asked] == [8, length]
    assert all(r["headers"]["authorization"] == "Bearer secret" for r in asked)
    assert served.model.stat().st_size > 8 + length + 400_000


def test_read_header_http_when_the_server_ignores_range(served: _Served) -> None:
    with serve_asgi(served) as base:
        header = read_header_http(f"{base}/no-range/model.safetensors", timeout_s=10)
        requests = served.wait_done()
    assert detect(header).family == "sd15"
    assert [r["headers"]["range"] for r in requests] == ["bytes=0-7"]
    # The client closed the body after the header: the server got nowhere near its end (what it
    # did send is what the socket buffers took before the close reached it).
    assert requests[0]["sent"] < served.IGNORED_RANGE_BYTES // 2


def test_read_header_http_errors(served: _Served) -> None:
    with serve_asgi(served) as base:
        with pytest.raises(
            HeaderError, match=r"/cat\.png: not a safetensors file: it starts like a PNG"
        ) as raised:
            read_header_http(f"{base}/cat.png?token=secret", timeout_s=10)
        assert "secret" not in str(raised.value)
        with pytest.raises(httpx.HTTPStatusError):
            read_header_http(f"{base}/missing", timeout_s=10)


def test_the_builtin_trainers_own_file_is_read_from_its_unet_config(tmp_path: Path) -> None:
    """The demo's toy model is SD 1.x-shaped at widths no real checkpoint has: its metadata
    (`format: loratrain.diffusers/1`, the UNet's config) names the family."""
    from gpu_runner.demo_assets import build_tiny_model

    found = detect(read_header_local(build_tiny_model(tmp_path / "tiny.safetensors")))
    assert (found.family, found.architecture, found.v_parameterization) == (
        "sd15",
        "SD 1.x",
        False,
    )
