"""The improvement loop over HTTP (full admin scope): start a round as a background job whose
progress per stage shows in ``GET /v1/jobs/{id}``, and read the rounds' history."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from docent.errors import DocentError
from docent.loop import TRAIN_KEYS, LoopRequest, loop_store, run_loop
from docent.progress import Progress
from serving.auth import require_full_admin
from serving.routes_admin import check_readable, state_of
from serving.schemas import JobOut
from serving.state import ServingState

router = APIRouter(prefix="/v1", dependencies=[Depends(require_full_admin)], tags=["operations"])
LOOP_JOB = "loop"


class LoopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(
        default_factory=list, max_length=1000,
        description="Files or folders on the server to refresh first (none: the index as it is).",
    )
    collection: str = Field(default="default", max_length=100)
    qa_file: str | None = Field(default=None, description="Human questions, first RAFT set only.")
    feedback: bool = Field(default=True, description="Learn from ratings and corrections.")
    dpo: bool | None = Field(default=None, description="Preference tuning after SFT.")
    force: bool = Field(default=False, description="Promote the best even if the gate says no.")
    even_if_unchanged: bool = Field(default=False, description="Train even if nothing changed.")
    train: dict[str, float] = Field(
        default_factory=dict, description=f"Training overrides: {', '.join(TRAIN_KEYS)}."
    )


@router.post("/loop", response_model=JobOut, status_code=202)
async def start_loop(body: LoopBody, request: Request) -> Any:
    """Start one round: refresh → RAFT set → SFT → DPO → scores → gated promotion; the server
    answers with the promoted adapter as soon as the round promotes one. 409 while a round
    runs (here or from `docent loop run` on the same workspace)."""
    state = state_of(request)
    paths = [Path(p).expanduser() for p in body.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise HTTPException(400, f"no such file or folder on the server: {', '.join(missing)}")
    qa_file = Path(body.qa_file).expanduser() if body.qa_file else None
    if qa_file is not None and not qa_file.exists():
        raise HTTPException(400, f"qa_file {qa_file} does not exist on the server")
    await asyncio.to_thread(check_readable, state, [*paths, *([qa_file] if qa_file else [])])
    train: dict[str, Any] = {
        k: int(v) if k in ("max_steps", "lora_r", "lora_alpha", "batch_size", "grad_accum")
        else v for k, v in body.train.items()
    }
    try:
        loop_request = LoopRequest(
            paths=[str(p) for p in paths], collection=body.collection,
            qa_file=str(qa_file) if qa_file else None, feedback=body.feedback, dpo=body.dpo,
            force=body.force, even_if_unchanged=body.even_if_unchanged, train=train,
        )
    except DocentError as exc:
        raise HTTPException(422, str(exc)) from exc
    store = loop_store(state.settings)
    queued = any(j.kind == LOOP_JOB and j.state in ("queued", "running") for j in state.jobs.list())
    if queued or store.busy():
        raise HTTPException(409, store.busy_message())
    job = state.jobs.submit(LOOP_JOB, body.model_dump(), loop_job(state, loop_request))
    return job.as_dict()


def loop_job(state: ServingState, loop_request: LoopRequest) -> Any:
    def run(progress: Progress) -> dict[str, Any]:
        record = run_loop(
            state.settings,
            loop_request,
            engine=state.engine,  # the served engine answers the loop's questions too
            embedder=state.embedder,
            progress=progress,
            # Switch at once rather than at the next registry poll.
            on_promote=lambda _name: state.follow_promoted(),
        )
        state.sync_index()
        return record.as_dict()

    return run


@router.get("/loop/history")
async def history(request: Request) -> dict[str, Any]:
    """Every round, oldest first: request, stages, lineage (index version → RAFT set and its
    hash → adapters → scores) and the gate's decision with its reason."""
    rounds = loop_store(state_of(request).settings).rounds()
    return {"rounds": [r.as_dict() for r in rounds]}


@router.get("/loop/{round_id}")
async def one_round(round_id: str, request: Request) -> dict[str, Any]:
    try:
        return loop_store(state_of(request).settings).get(round_id).as_dict()
    except DocentError as exc:
        raise HTTPException(404, str(exc)) from exc
