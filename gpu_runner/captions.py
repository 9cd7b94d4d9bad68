"""What each family's text encoder reads of a caption, checked before anything is uploaded.

SD 1.x, SD 2.x and SDXL read captions with CLIP: 77 tokens with the start and end tokens, so 75
of the caption's own, and sd-scripts cuts the rest (its `--max_token_length` 150/225 is not
used here). Flux.1 and SD 3.x also read them with T5-XXL, as long as sd-scripts' own limits:
`--t5xxl_max_token_length` 512 for Flux.1 dev, 256 for schnell (flux_train_network.py), 256 for
SD 3.x (sd3_train_network.py); CLIP's 75 still bind their CLIP encoders, which only steer.

Counting needs no vocabulary: every word, number or run of punctuation CLIP's pre-tokenizer
splits off is at least one BPE token, and T5's SentencePiece pieces never span a space, so a
count of those pieces is a lower bound. A caption over the limit by that count is certainly
cut; the warning says "at least".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .protocol import BaseModelFamily

# CLIP's pre-tokenizer (open_clip / transformers CLIPTokenizer) splits on these, after
# lowercasing: contractions, letter runs, single digits, runs of other non-space characters.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)
_WORDS = re.compile(r"\S+")
CLIP_TOKENS = 75


@dataclass(frozen=True)
class TokenLimit:
    encoder: str  # "CLIP" or "T5"
    tokens: int  # of the caption's own, start and end tokens not counted


def token_limits(family: BaseModelFamily, variant: str | None = None) -> list[TokenLimit]:
    """The limits a family's text encoders put on a caption, tightest first."""
    clip = TokenLimit("CLIP", CLIP_TOKENS)
    if family == "flux":
        return [clip, TokenLimit("T5", 256 if variant == "schnell" else 512)]
    if family == "sd3":
        return [clip, TokenLimit("T5", 256)]
    return [clip]


def tokens_at_least(caption: str, encoder: str) -> int:
    """A lower bound of the tokens `encoder` makes of `caption`."""
    if encoder == "CLIP":
        return len(_CLIP_PIECES.findall(caption))
    return len(_WORDS.findall(caption))


def caption_warnings(
    captions: dict[str, str], family: BaseModelFamily, variant: str | None = None
) -> list[str]:
    """One line per caption that a text encoder of `family` certainly cuts, naming the file,
    the count and what is read. For T5 families CLIP's cut is expected (CLIP only steers
    there), so only T5's limit warns."""
    limits = token_limits(family, variant)
    binding = limits[1:] if len(limits) > 1 else limits
    lines = []
    for name, caption in sorted(captions.items()):
        for limit in binding:
            count = tokens_at_least(caption, limit.encoder)
            if count > limit.tokens:
                lines.append(
                    f"{name}: at least {count} {limit.encoder} tokens; {family_name(family)} "
                    f"reads the first {limit.tokens}, the rest of the caption is not trained on"
                )
    return lines


def family_name(family: BaseModelFamily) -> str:
    return {
        "sd15": "SD 1.x",
        "sd2": "SD 2.x",
        "sdxl": "SDXL",
        "flux": "Flux.1",
        "sd3": "SD 3.x",
    }.get(family, family)
