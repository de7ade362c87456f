"""`saelab judge serve`: the raters' web app (Starlette on uvicorn).

Routes (every one of them blind: none reads the key table):

    GET  /                     the page (HTML, its script and style inline; no data)
    POST /api/join             {"rater"} -> the rater's instructions' tasks and first trial
    GET  /api/next?rater=NAME  the rater's next unanswered trial: {"trial", "task",
                               "payload", "done", "total"} ({"trial": null} when finished)
    POST /api/answer           {"rater", "trial", "answer", "seconds"} -> the next trial
    POST /api/undo             {"rater"} -> the trial whose answer was undone, shown again

Each answer is committed (WAL, synchronous=FULL) before the response is sent. On another
interface than localhost the server needs `--token`, and every request must carry it, as
`Authorization: Bearer TOKEN` or `?token=TOKEN` (the page passes it on to the API).
"""

from __future__ import annotations

import hmac
import secrets
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from saelab.config import say
from saelab.errors import SaelabError
from saelab.judge.db import DATABASE, StudyDB

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ANSWERS = {"rate": ("score", "explanation"), "pair": ("choice", "confidence"),
           "intruder": ("choice",)}


@dataclass(frozen=True, kw_only=True)
class JudgeServeConfig:
    POSITIONAL = ("study",)
    study: Path
    """Study folder made by `saelab judge new`."""
    host: str = "127.0.0.1"
    """Interface to listen on (anything but localhost needs --token)."""
    port: int = 8765
    """Port to listen on."""
    token: str | None = None
    """A secret every request must carry (required off localhost)."""

    def __post_init__(self) -> None:
        if self.host not in LOCAL_HOSTS and not self.token:
            raise SaelabError(f"serving on {self.host} needs a token",
                              expected="--token SECRET (raters open /?token=SECRET)",
                              found="no token", fix="pass --token, or serve on 127.0.0.1")


def _valid(task: str, answer: Any) -> bool:
    """An answer of the shape its task takes."""
    if not isinstance(answer, dict) or set(answer) - set(ANSWERS[task]):
        return False
    if task == "rate":
        return answer.get("score") in (0, 1, 2) and isinstance(answer.get("explanation", ""),
                                                                str)
    if task == "pair":
        return answer.get("choice") in ("left", "right", "same") and \
            answer.get("confidence", 2) in (1, 2, 3)
    return answer.get("choice") in range(5)


def create_app(study: Path, token: str | None = None) -> Any:
    """The Starlette app serving `study` (one database connection per thread)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    path = study / DATABASE
    StudyDB(path).close()  # fails now, with the error, if there is no study
    local = threading.local()
    page = resources.files("saelab.judge").joinpath("page.html").read_text()

    def db() -> StudyDB:
        if getattr(local, "db", None) is None:
            local.db = StudyDB(path)
        return local.db

    def trial_for(rater: str) -> dict[str, Any]:
        store = db()
        done, total = store.progress(rater)
        nxt = store.next_trial(rater)
        if nxt is None:
            return {"trial": None, "done": done, "total": total}
        task, payload = store.trial(nxt)
        return {"trial": nxt, "task": task, "payload": payload, "done": done, "total": total}

    def refused(what: str) -> JSONResponse:
        return JSONResponse({"error": what}, status_code=400)

    async def rater_of(request: Request) -> str | None:
        body = await request.json() if request.method == "POST" else dict(request.query_params)
        name = body.get("rater") if isinstance(body, dict) else None
        if not isinstance(name, str) or not 0 < len(name.strip()) <= 80:
            return None
        request.state.body = body
        return name.strip()

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)  # only the page's own script and style run
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                  "connect-src 'self'; base-uri 'none'; form-action 'none'")
        return HTMLResponse(page.replace("__NONCE__", nonce),
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy": policy})

    def with_rater(handler: Any) -> Any:
        """A route that needs a rater's name (1 to 80 characters) and refuses the rest."""
        async def route(request: Request) -> Response:
            rater = await rater_of(request)
            if rater is None:
                return refused("a rater name of 1 to 80 characters")
            return await handler(request, rater)
        return route

    @with_rater
    async def join(request: Request, rater: str) -> Response:
        db().join(rater)
        return JSONResponse({"rater": rater, "tasks": sorted(db().tasks()), **trial_for(rater)})

    @with_rater
    async def next_trial(request: Request, rater: str) -> Response:
        return JSONResponse(trial_for(rater))

    @with_rater
    async def answer(request: Request, rater: str) -> Response:
        body = request.state.body
        trial, given = body.get("trial"), body.get("answer")
        seconds = body.get("seconds")
        try:
            task, _ = db().trial(int(trial))
        except (KeyError, TypeError, ValueError):
            return refused("a trial of this study")
        if not _valid(task, given):
            return refused(f"an answer to a {task} trial")
        db().join(rater)
        try:
            db().answer(rater, int(trial), given,
                        float(seconds) if isinstance(seconds, (int, float)) else None)
        except SaelabError:
            return refused("a trial not answered yet (undo it first)")
        return JSONResponse(trial_for(rater))

    @with_rater
    async def undo(request: Request, rater: str) -> Response:
        back = db().undo(rater)
        state = trial_for(rater)
        if back is not None:
            task, payload = db().trial(back)
            state = {**state, "trial": back, "task": task, "payload": payload}
        return JSONResponse({**state, "undone": back is not None})

    class TokenCheck(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Response:
            given = request.query_params.get("token") or \
                request.headers.get("authorization", "").removeprefix("Bearer ")
            if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "this server needs its token"}, status_code=401)
            response = await call_next(request)
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

    routes = [Route("/", index), Route("/api/join", join, methods=["POST"]),
              Route("/api/next", next_trial), Route("/api/answer", answer, methods=["POST"]),
              Route("/api/undo", undo, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(TokenCheck)])


def serve(cfg: JudgeServeConfig) -> dict[str, Any]:
    """Serve the study until interrupted."""
    try:
        import uvicorn
    except ImportError as err:
        raise SaelabError("saelab judge serve needs starlette and uvicorn",
                          expected="pip install 'saelab[judge]'", found=str(err),
                          fix="install the judge extra") from err
    app = create_app(cfg.study, cfg.token)
    query = f"?token={cfg.token}" if cfg.token else ""
    say(f"serving {cfg.study} at http://{cfg.host}:{cfg.port}/{query} (Ctrl-C stops it; "
        "every answer is saved as it is given)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return {"study": str(cfg.study)}
