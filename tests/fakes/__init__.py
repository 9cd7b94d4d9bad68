"""Fakes of third-party HTTP APIs, served over real HTTP (tests/http_support.serve_asgi)."""
