"""Stand-in for sd-scripts' `library` package (only what the stand-in scripts use)."""
