"""Caption limits per family: a caption a text encoder certainly cuts is named, with the count."""

from __future__ import annotations

from gpu_runner.captions import caption_warnings, token_limits, tokens_at_least


def test_clip_pieces_are_a_lower_bound_of_clip_tokens() -> None:
    # Words, each digit, and runs of punctuation are separate pieces for CLIP's BPE.
    assert tokens_at_least("a photo of sks dog, 1024px", "CLIP") == 11
    assert tokens_at_least("don't", "CLIP") == 2
    assert tokens_at_least("a photo of sks dog, 1024px", "T5") == 6


def test_a_long_caption_warns_for_clip_families_only_past_75_tokens() -> None:
    short = " ".join(["word"] * 75)
    long = " ".join(["word"] * 90)
    for family in ("sd15", "sd2", "sdxl"):
        (line,) = caption_warnings({"a.txt": short, "b.txt": long}, family)
        assert line.startswith("b.txt: at least 90 CLIP tokens;")
        assert "reads the first 75" in line


def test_t5_families_warn_past_their_t5_limit_not_clips() -> None:
    captions = {"c.txt": " ".join(["word"] * 300)}
    assert caption_warnings(captions, "flux", "dev") == []
    (schnell,) = caption_warnings(captions, "flux", "schnell")
    assert "at least 300 T5 tokens; Flux.1 reads the first 256" in schnell
    (sd3,) = caption_warnings(captions, "sd3", "large")
    assert "SD 3.x reads the first 256" in sd3
    assert [limit.tokens for limit in token_limits("flux", "dev")] == [75, 512]
