"""Operator endpoints (admin scope): refresh the index, regenerate the RAFT set, watch jobs,
roll the promoted adapter back."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from docent.workspace import Workspace
from ingest.readers import is_supported
from raft.adapters import AdapterError
from serving.auth import Principal, require_admin, require_full_admin
from serving.schemas import JobOut, RefreshBody, RegenerateBody
from serving.state import ServingState

router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)], tags=["operations"])
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()-]{0,200}$")
MAX_FILES = 1000


def state_of(request: Request) -> ServingState:
    return request.app.state.docent  # type: ignore[no-any-return]


@router.post("/index/refresh", response_model=JobOut, status_code=202)
async def refresh(request: Request, principal: Principal = Depends(require_admin)) -> Any:
    """Start an incremental refresh. JSON ``{"paths": [...], "collection", "rebuild"}`` reads
    files on the server; multipart ``files=...`` (+ ``collection``) uploads them. Questions
    keep being answered from the current index and switch to the new one when it is done."""
    state = state_of(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        paths, collection, rebuild, params = await _save_uploads(state, request, principal)
    else:
        try:
            body = RefreshBody.model_validate_json(await request.body())
        except ValidationError as exc:
            raise HTTPException(422, f"invalid refresh body: {exc.errors()[0]['msg']}") from exc
        collection, rebuild = body.collection, body.rebuild
        _check_collection(collection, principal)
        paths = [Path(p).expanduser() for p in body.paths]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise HTTPException(400, f"no such file or folder on the server: {', '.join(missing)}")
        await asyncio.to_thread(check_readable, state, paths)
        params = body.model_dump()
    job = state.jobs.submit("index_refresh", params, state.refresh_job(paths, collection, rebuild))
    return job.as_dict()


def allowed_roots(state: ServingState) -> list[Path]:
    roots = state.settings.refresh_roots or [state.started_in]
    return [r.expanduser().resolve() for r in roots]


def check_readable(state: ServingState, paths: list[Path]) -> None:
    """Refuse server paths outside the allowed roots (``..`` and symlinks resolved first), and
    Docent's own workspace but its uploads: a refresh must not turn the server's files, or
    its stored answers and training sets, into retrievable chunks."""
    from ingest.pipeline import iter_sources

    roots = allowed_roots(state)
    workspace = Workspace(state.settings.workspace).root.resolve()
    uploads = workspace / "uploads"
    files = [f for _, f in iter_sources(paths)]
    for path in [*paths, *files]:
        real = path.resolve()
        inside_workspace = real.is_relative_to(workspace) and not real.is_relative_to(uploads)
        if inside_workspace or not any(real.is_relative_to(r) for r in roots):
            raise HTTPException(
                403,
                f"{path}: outside the folders this server may read ({', '.join(map(str, roots))}); "
                "an operator can allow more with DOCENT_REFRESH_ROOTS",
            )


async def _save_uploads(
    state: ServingState, request: Request, principal: Principal
) -> tuple[list[Path], str, bool, dict[str, Any]]:
    form = await request.form(max_files=MAX_FILES, max_fields=20)
    collection = str(form.get("collection") or "default")
    _check_collection(collection, principal)
    uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not uploads:
        raise HTTPException(422, "no files: send them as multipart field 'files'")
    for upload in uploads:
        name = upload.filename or ""
        if not SAFE_NAME.match(name) or name in (".", ".."):
            raise HTTPException(422, f"file name {name!r}: use letters, digits, ' ._()-'")
        if not is_supported(Path(name)):
            raise HTTPException(
                415, f"{name}: unsupported type; send txt, md, html, pdf, docx or jsonl"
            )
    # Uploads of one collection live in one folder, so refreshing it keeps earlier uploads.
    folder = Workspace(state.settings.workspace).root / "uploads" / collection
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for upload in uploads:
        target = folder / str(upload.filename)
        tmp = target.with_name(f".{target.name}.part")
        with tmp.open("wb") as out:
            shutil.copyfileobj(upload.file, out)
        tmp.replace(target)
        saved.append(target.name)
    params = {"uploaded": saved, "collection": collection, "rebuild": False}
    return [folder], collection, False, params


def _check_collection(collection: str, principal: Principal) -> None:
    if not collection or not collection.replace("-", "").replace("_", "").isalnum():
        raise HTTPException(422, f"collection {collection!r}: use letters, digits, '-' or '_'")
    if not principal.may_read(collection):
        raise HTTPException(403, f"this API key may not refresh collection {collection!r}")


@router.post(
    "/raft/regenerate",
    response_model=JobOut,
    status_code=202,
    dependencies=[Depends(require_full_admin)],
)
async def regenerate(body: RegenerateBody, request: Request) -> Any:
    """Rebuild the RAFT training set from the current index (and reviewers' corrections)."""
    state = state_of(request)
    qa_file = Path(body.qa_file).expanduser() if body.qa_file else None
    if qa_file is not None:
        if not qa_file.exists():
            raise HTTPException(400, f"qa_file {qa_file} does not exist on the server")
        check_readable(state, [qa_file])
    job = state.jobs.submit(
        "raft_regenerate",
        body.model_dump(),
        state.regenerate_job(body.limit, qa_file, body.include_feedback, body.name),
    )
    return job.as_dict()


@router.get("/jobs/{job_id}", response_model=JobOut)
async def job(job_id: str, request: Request) -> Any:
    return state_of(request).jobs.get(job_id).as_dict()


@router.get("/jobs", dependencies=[Depends(require_full_admin)])
async def jobs(request: Request, limit: int = 50) -> dict[str, Any]:
    return {"jobs": [j.as_dict() for j in state_of(request).jobs.list(max(1, min(limit, 500)))]}


@router.post("/adapters/rollback", dependencies=[Depends(require_full_admin)])
async def rollback_adapter(request: Request) -> dict[str, Any]:
    """Promote the adapter promoted before the current one (``promoted: null``: the base
    model) and serve it. ``serving`` is what default requests are answered with now: where
    vLLM runs adapters merged, the new weights load in the background (``switching``) and the
    old ones answer until then. 409 when there is nothing to roll back to."""
    state = state_of(request)
    try:
        info = await asyncio.to_thread(state.adapters.registry.rollback)
    except AdapterError as exc:
        raise HTTPException(409, str(exc)) from exc
    live = await asyncio.to_thread(state.follow_promoted)
    return {"promoted": info.name if info else None, "serving": live.as_dict()}
