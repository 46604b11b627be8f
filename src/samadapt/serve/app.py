"""The FastAPI app behind ``samadapt serve``: a JSON / binary API over ``Workspace`` and the static page.

Routes (all ``/api`` routes take the token as ``X-Token`` header, ``token`` query parameter or the cookie that ``GET
/?token=...`` sets, when one is set; ``guard.Guard`` makes every refusal that comes before a route):

| route | what |
|---|---|
| ``GET /`` , ``/static/*`` | the page (plain HTML / JS / CSS) |
| ``GET /api/info`` | model, task, classes, the cases offered, the labels folder |
| ``POST /api/open`` ``{path, preset?}`` | open a case -> session summary (restored from autosave when there is one) |
| ``GET /api/slice/{sid}?axis&index`` | the stored intensities of a slice, float32 little-endian, ``X-Shape: h,w,c`` |
| ``GET /api/labels/{sid}?axis&index`` | the slice's labels (JSON: ``h``, ``w``, base64 uint16 little-endian) |
| ``POST /api/prompt`` ``{session, axis, index, object, point: [x, y, 1 / 0] or box: [x0, y0, x1, y1]}`` | segment |
| ``POST /api/undo`` / ``redo`` / ``erase`` / ``semantic`` / ``objects`` | edits |
| ``POST /api/propagate`` ``{session, axis, index, object, settle?, overwrite?}`` -> job | propagate / re-propagate |
| ``POST /api/complete`` ``{session, axis, steps, overwrite?}`` -> job; ``GET /api/jobs/{id}`` | complete the volume |
| ``POST /api/save`` ``{session, path?, overwrite}`` | write the label file (409 when it exists) |
| ``POST /api/adapt`` ``{session, recipe, steps}`` -> job; ``POST /api/model`` ``{run}`` | adapt, switch model |
| ``POST /api/components`` ``{mode}`` | keep every component of a mask (``all``) or those the prompt touches |

Errors come back as ``{"detail": message}``: 403 outside the allowed folders, a wrong token, a foreign ``Host`` or
``Origin``, 404 missing file or session, 409 a file that exists, 413 a request too large, 422 unreadable data, 400
other bad input.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from samadapt.errors import DataError
from samadapt.serve.case import Session
from samadapt.serve.guard import Guard, token_cookie, token_given
from samadapt.serve.jobs import Jobs, propagate
from samadapt.serve.session import Workspace

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # JSON requests only: prompts and paths, never image data


class OpenRequest(BaseModel):
    path: str
    preset: str | None = None


class SliceRequest(BaseModel):
    session: str
    axis: int
    index: int


class PromptRequest(SliceRequest):
    object: int
    point: list[float] | None = None
    box: list[float] | None = None


class ObjectRequest(SliceRequest):
    object: int = 0
    name: str | None = None


class PropagateRequest(SliceRequest):
    object: int
    settle: bool = False  # a re-propagation after a corrective click (jobs.propagate)
    overwrite: bool = False


class CompleteRequest(SliceRequest):
    steps: int = 120
    overwrite: bool = False


class SaveRequest(BaseModel):
    session: str
    path: str | None = None
    overwrite: bool = False


class AdaptRequest(BaseModel):
    session: str
    recipe: str = "cheap-lunch"
    steps: int = 40


class ModelRequest(BaseModel):
    run: str


class ComponentsRequest(BaseModel):
    mode: str


def plane_payload(session: Session, axis: int, index: int) -> dict:
    """The labels of one slice for the page: (h, w) uint16, little-endian, base64."""
    plane = session.plane(axis, index)
    h, w = plane.shape
    data = base64.b64encode(np.ascontiguousarray(plane, "<u2").tobytes()).decode()
    prompts = [
        {"object": value, "points": p["points"], "box": p["box"]}
        for (value, a, i), p in session.prompts.items()
        if (a, i) == (axis, index) and (p["points"] or p["box"])  # an erased or auto-labelled slice has no marks
    ]
    return {"axis": axis, "index": index, "h": h, "w": w, "labels": data, "prompts": prompts}


ERROR_STATUS: dict[type[Exception], int] = {
    PermissionError: 403,
    FileExistsError: 409,
    FileNotFoundError: 404,
    KeyError: 404,
    DataError: 422,
    ValueError: 400,
}


def _error_response(status: int):
    async def handler(request: Request, error: Exception) -> JSONResponse:
        # a KeyError's str() quotes its key; the message is its first argument
        detail = error.args[0] if isinstance(error, KeyError) and error.args else error
        return JSONResponse({"detail": str(detail)}, status_code=status)

    return handler


def create_app(workspace: Workspace, token: str | None = None, hosts: Iterable[str] = ()) -> FastAPI:
    """The app over ``workspace``; with ``token``, every ``/api`` request must carry it. Requests are answered only
    for the loopback names and ``hosts`` (``Guard``: Host, Origin, token and size checks)."""
    app = FastAPI(title="samadapt serve", docs_url=None, redoc_url=None)
    app.state.workspace = workspace
    app.state.jobs = jobs = Jobs()
    app.state.token = token
    ws = workspace

    app.add_middleware(Guard, token=token, hosts=hosts, max_body=MAX_BODY)

    # errors the library raises for a request's own problem, answered with their message and a status
    for kind, status in ERROR_STATUS.items():
        app.add_exception_handler(kind, _error_response(status))

    @app.get("/")
    def index(request: Request) -> Response:
        if token and request.query_params.get("token") and token_given(request, token):
            # the address samadapt serve printed: keep the token in a cookie of this origin, then drop it from the
            # address bar (and history); the page's requests carry the cookie
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(token_cookie(request), token, httponly=True, samesite="strict")
            return response
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict:
        return {**ws.model_info(), "cases": ws.cases(), "labels_dir": str(ws.labels_dir)}

    @app.post("/api/open")
    def open_case(request: OpenRequest) -> dict:
        session = ws.open(request.path, request.preset)
        ws.prefetch(session, session.axis, [session.labels.shape[session.axis] // 2])
        return session.summary()

    @app.get("/api/session/{session_id}")
    def session_summary(session_id: str) -> dict:
        return ws.session(session_id).summary()

    @app.get("/api/slice/{session_id}")
    def slice_pixels(session_id: str, axis: int, index: int) -> Response:
        session = ws.session(session_id)
        raw = session.raw(axis, index)
        shape = (*raw.shape[:2], raw.shape[2] if raw.ndim == 3 else 1)
        ws.prefetch(session, axis, [index, index + 1, index - 1])
        body = np.ascontiguousarray(raw, "<f4").tobytes()
        return Response(body, media_type="application/octet-stream", headers={"X-Shape": ",".join(map(str, shape))})

    @app.get("/api/labels/{session_id}")
    def slice_labels(session_id: str, axis: int, index: int) -> dict:
        return plane_payload(ws.session(session_id), axis, index)

    @app.post("/api/prompt")
    def prompt(request: PromptRequest) -> dict:
        if (request.point is None) == (request.box is None):
            raise ValueError("give one click (point: [x, y, 1 or 0]) or one box ([x0, y0, x1, y1])")
        if request.point is not None and len(request.point) != 3:
            raise ValueError("a click is [x, y, label]")
        if request.box is not None and len(request.box) != 4:
            raise ValueError("a box is [x0, y0, x1, y1]")
        session = ws.session(request.session)
        timing = ws.prompt(session, request.axis, request.index, request.object, request.point, request.box)
        return {**timing, **plane_payload(session, request.axis, request.index)}

    def _edit(request: SliceRequest, step) -> dict:
        session = ws.session(request.session)
        edit = step(session)
        payload = plane_payload(session, request.axis, request.index)
        return {
            **payload,
            "what": edit.what if edit else None,
            "edit_axis": edit.axis if edit else None,
            "edit_index": edit.index if edit else None,
        }

    @app.post("/api/undo")
    def undo(request: SliceRequest) -> dict:
        return _edit(request, lambda s: s.undo_last())

    @app.post("/api/redo")
    def redo(request: SliceRequest) -> dict:
        return _edit(request, lambda s: s.redo_last())

    @app.post("/api/erase")
    def erase(request: ObjectRequest) -> dict:
        session = ws.session(request.session)
        ws.erase(session, request.axis, request.index, request.object)
        return plane_payload(session, request.axis, request.index)

    @app.post("/api/semantic")
    def semantic(request: SliceRequest) -> dict:
        session = ws.session(request.session)
        start = time.perf_counter()
        result = ws.semantic(session, request.axis, request.index)
        result["server_ms"] = (time.perf_counter() - start) * 1000
        return {**result, **plane_payload(session, request.axis, request.index), **session.summary()}

    @app.post("/api/objects")
    def add_object(request: ObjectRequest) -> dict:
        session = ws.session(request.session)
        value = session.add_object(request.name)
        return {"object": value, **session.summary()}

    @app.post("/api/propagate")
    def start_propagation(request: PropagateRequest) -> dict:
        session = ws.session(request.session)
        if not (session.plane(request.axis, request.index) == request.object).any():
            raise ValueError(f"object {request.object} is empty on this slice: segment it here first")
        r = request
        job = jobs.start(
            "propagate",
            lambda job: propagate(ws, session, r.axis, r.index, r.object, job, settle=r.settle, overwrite=r.overwrite),
        )
        return job.as_dict()

    @app.post("/api/complete")
    def complete(request: CompleteRequest) -> dict:
        from samadapt.serve.complete import complete_job, given_slices

        session = ws.session(request.session)
        given_slices(session, request.axis)  # refuses at once when nothing is finished along the axis
        job = jobs.start(
            "complete", lambda job: complete_job(ws, session, request.axis, request.steps, request.overwrite, job)
        )
        return job.as_dict()

    @app.get("/api/jobs/{job_id}")
    def job_state(job_id: str) -> dict:
        return jobs.get(job_id).as_dict()

    @app.post("/api/save")
    def save(request: SaveRequest) -> dict:
        session = ws.session(request.session)
        path = ws.save(session, request.path, request.overwrite)
        return {"path": str(path)}

    @app.post("/api/adapt")
    def adapt(request: AdaptRequest) -> dict:
        from samadapt.serve.adapt import adapt_job

        session = ws.session(request.session)
        job = jobs.start("adapt", lambda job: adapt_job(ws, session, request.recipe, request.steps, job))
        return job.as_dict()

    @app.post("/api/components")
    def keep_components(request: ComponentsRequest) -> dict:
        ws.set_keep_components(request.mode)
        return ws.model_info()

    @app.post("/api/model")
    def switch_model(request: ModelRequest) -> dict:
        from samadapt.inference import load_predictor
        from samadapt.runs import load_run

        run = ws.runs.get(request.run)
        if run is None:
            path = Path(request.run)
            if path.exists():
                ws.check(path)
            run = load_run(request.run, device=ws.device)
        ws.use_predictor(load_predictor(run, device=ws.device))
        return ws.model_info()

    return app
