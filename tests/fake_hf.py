"""A fake Hugging Face Hub, shaped like the real one at its HTTP API, for tests.

What it imitates (huggingface.co as huggingface_hub talks to it):
- `GET|HEAD /{repo}/resolve/{revision}/{path}`: an LFS file answers 302 to its CDN URL with
  `X-Linked-Size`, `X-Linked-Etag` (the sha256, quoted), `X-Repo-Commit` and `ETag`; a small
  (non-LFS) file is served in place (200, its git blob id as ETag). Errors carry `X-Error-Code`
  and `X-Error-Message`: a gated repo answers 401 `GatedRepo` without a token and 403 with a token
  not granted access; an unknown or private repo answers 401 `RepoNotFound` to anonymous callers
  (the Hub does not tell them apart) and 404 to a valid token; a bad token is 401; unknown
  revisions are 404 `RevisionNotFound`, unknown files 404 `EntryNotFound`.
- The CDN URL (`/cdn/{sha256}?expires=&sig=`) serves the bytes with Range support (206,
  `Content-Range`, 416), 403 for a forged or expired signature.

    hub = FakeHub(token="hf_x")
    hub.add_file("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", content, gated=True)
    with serve_asgi(hub.app) as base_url: ...
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_civitai import byte_range

# Files at least this big are stored in LFS (the Hub's threshold is 10 MB; tests' files are tiny,
# so the fake treats every .safetensors as LFS, like the Hub's .gitattributes does).
_LFS_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt")


@dataclass
class FakeRepo:
    id: str
    gated: bool = False
    private: bool = False
    # revision -> path -> content
    revisions: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})

    def commit(self, revision: str) -> str:
        return hashlib.sha1(f"{self.id}@{revision}".encode()).hexdigest()


class FakeHub:
    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        # Repos the token may read although they are gated or private (default: all).
        self.denied: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._sign_key = secrets.token_bytes(32)
        self._blobs: dict[str, bytes] = {}
        self.app = Starlette(
            routes=[
                Route("/cdn/{sha256}", self._cdn, methods=["GET", "HEAD"]),
                Route(
                    "/{owner}/{name}/resolve/{revision}/{path:path}",
                    self._resolve,
                    methods=["GET", "HEAD"],
                ),
            ]
        )

    # -- knobs ---------------------------------------------------------------------------------

    def add_file(
        self,
        repo_id: str,
        path: str,
        content: bytes,
        *,
        revision: str = "main",
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Add a file; returns its hf: reference."""
        repo = self.repos.setdefault(repo_id, FakeRepo(repo_id))
        repo.gated = repo.gated or gated
        repo.private = repo.private or private
        repo.revisions.setdefault(revision, {})[path] = content
        self._blobs[hashlib.sha256(content).hexdigest()] = content
        at = "" if revision == "main" else f"@{revision}"
        return f"hf:{repo_id}{at}/{path}"

    # -- helpers -------------------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        self.requests.append((request.method, path, dict(request.headers)))

    def _token_of(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    @staticmethod
    def _error(status: int, code: str | None, message: str) -> Response:
        headers = {"x-error-message": message}
        if code:
            headers["x-error-code"] = code
        return JSONResponse({"error": message}, status, headers=headers)

    def _access(self, request: Request, repo_id: str) -> FakeRepo | Response:
        """The repo, or the error the Hub answers for it to this caller."""
        token = self._token_of(request)
        if token is not None and not hmac.compare_digest(token, self.token):
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo = self.repos.get(repo_id)
        hidden = repo is None or (repo.private and (token is None or repo_id in self.denied))
        if hidden:
            status = 401 if token is None else 404
            return self._error(
                status,
                "RepoNotFound",
                "Repository not found",
            )
        assert repo is not None
        if repo.gated:
            if token is None:
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and "
                    "be authenticated to access it. Please log in.",
                )
            if repo_id in self.denied:
                return self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the "
                    f"authorized list. Visit https://huggingface.co/{repo_id} to ask for access.",
                )
        return repo

    def _sign(self, sha256: str, expires: int) -> str:
        msg = f"{sha256}:{expires}".encode()
        return base64.urlsafe_b64encode(hmac.digest(self._sign_key, msg, "sha256")).decode()

    @staticmethod
    def _origin(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    # -- routes --------------------------------------------------------------------------------

    async def _resolve(self, request: Request) -> Response:
        self._record(request)
        params = request.path_params
        repo_id = f"{params['owner']}/{params['name']}"
        found = self._access(request, repo_id)
        if isinstance(found, Response):
            return found
        files = found.revisions.get(params["revision"])
        if files is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {params['revision']}")
        content = files.get(params["path"])
        if content is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        commit = found.commit(params["revision"])
        if params["path"].endswith(_LFS_SUFFIXES):
            sha = hashlib.sha256(content).hexdigest()
            expires = int(time.time()) + 3600
            query = f"expires={expires}&sig={self._sign(sha, expires)}"
            location = f"{self._origin(request)}/cdn/{sha}?{query}"
            return Response(
                status_code=302,
                headers={
                    "location": location,
                    "x-repo-commit": commit,
                    "x-linked-etag": f'"{sha}"',
                    "x-linked-size": str(len(content)),
                    "etag": f'"{sha}"',
                    "content-type": "text/plain; charset=utf-8",
                },
            )
        blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        return _ranged(request, content, {"x-repo-commit": commit, "etag": f'"{blob}"'})

    async def _cdn(self, request: Request) -> Response:
        self._record(request)
        sha = request.path_params["sha256"]
        try:
            expires = int(request.query_params.get("expires", ""))
        except ValueError:
            expires = 0
        content = self._blobs.get(sha)
        sig = request.query_params.get("sig", "")
        if (
            content is None
            or not hmac.compare_digest(sig, self._sign(sha, expires))
            or expires < time.time()
        ):
            return Response(b"<Error><Code>AccessDenied</Code></Error>", 403)
        return _ranged(request, content, {"etag": f'"{sha}"'})


def _ranged(request: Request, content: bytes, extra: dict[str, str]) -> Response:
    headers = {"accept-ranges": "bytes", **extra}
    served = byte_range(request, len(content), headers)
    if isinstance(served, Response):
        return served
    start, end, status = served
    body = b"" if request.method == "HEAD" else content[start : end + 1]
    return Response(
        body, status_code=status, headers=headers, media_type="application/octet-stream"
    )
