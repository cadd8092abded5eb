"""Request and response bodies of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Hard ceilings; the configured limits (DOCENT_MAX_*) are checked in the handlers.
MAX_TEXT = 100_000


class FilterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: list[str] | str | None = Field(default=None, description="Source file(s), exact.")
    section: str | None = Field(default=None, max_length=500, description="Section contains.")
    collection: list[str] | str | None = None


class AskBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=MAX_TEXT)
    k: int | None = Field(default=None, ge=1, description="Chunks to retrieve (default top_k).")
    filters: FilterBody | None = None
    adapter: str | None = Field(
        default=None, description="An adapter name, 'base', or unset for the served default."
    )
    stream: bool = Field(default=False, description="Server-sent events instead of one JSON.")
    max_tokens: int | None = Field(default=None, ge=1)


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str | None = Field(
        default=None, description="Continue this conversation; unset starts a new one."
    )
    message: str = Field(min_length=1, max_length=MAX_TEXT)
    mode: Literal["tutor", "support"] = "support"
    k: int | None = Field(default=None, ge=1)
    filters: FilterBody | None = None
    adapter: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)


class CitationOut(BaseModel):
    document: int
    chunk_id: str
    source: str
    section: str | None
    page: int | None
    quote: str = Field(
        description="The model's verbatim quote, or for kind 'attributed' the retrieved "
        "sentence that states the answer."
    )
    score: float
    kind: Literal["quote", "attributed"] = Field(
        default="quote",
        description="quote: the model quoted the chunk; attributed: the model did not quote "
        "(or its quotes do not state the answer) and Docent found the supporting sentence.",
    )


class ChunkOut(BaseModel):
    chunk_id: str
    source: str
    section: str | None
    page: int | None
    collection: str
    score: float
    scores: dict[str, float]
    text: str


class AnswerOut(BaseModel):
    id: str
    question: str
    answer: str
    reasoning: str
    declined: bool
    grounded: bool
    ungrounded: bool = Field(
        default=False,
        description="No retrieved chunk supports the model's answer (no supporting quote, no "
        "sentence stating it). With declined=true Docent withheld that answer "
        "(DOCENT_DECLINE_UNGROUNDED).",
    )
    citations: list[CitationOut]
    unsupported_quotes: list[str]
    chunks: list[ChunkOut]
    model: str
    adapter: str | None
    finish_reason: str
    usage: dict[str, int]
    timings: dict[str, float]
    session_id: str | None = None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer_id: str = Field(min_length=1, max_length=100)
    rating: int = Field(ge=-1, le=1, description="1 good, -1 bad, 0 neutral.")
    correction: str | None = Field(
        default=None, max_length=4000, description="The right answer; used in the next RAFT set."
    )
    comment: str | None = Field(default=None, max_length=4000)


class RefreshBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, description="Files or folders on the server.")
    collection: str = "default"
    rebuild: bool = False


class RegenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int | None = Field(default=None, ge=1, description="Use at most N chunks.")
    qa_file: str | None = Field(default=None, description="Human questions on the server.")
    include_feedback: bool = Field(default=True, description="Train on reviewers' corrections.")
    name: str | None = None


class JobOut(BaseModel):
    id: str
    kind: str
    state: str
    params: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    progress: dict[str, dict[str, int]]
    result: dict[str, Any] | None
    error: str | None


# OpenAI-compatible bodies ------------------------------------------------------------------
class OAIMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class DocentOptions(BaseModel):
    """Docent's own knobs, sent as ``extra_body={"docent": {...}}`` by the openai client."""

    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(default=None, ge=1)
    filters: FilterBody | None = None
    mode: Literal["tutor", "support"] | None = None
    include_reasoning: bool = Field(
        default=False, description="Content is the whole RAFT output (reasoning and quotes)."
    )
    sources_in_content: bool = Field(
        default=True, description="Append a 'Sources:' line to the content."
    )


class ChatCompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored, not refused
    model: str = "docent"
    messages: list[OAIMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream_options: dict[str, Any] | None = None
    docent: DocentOptions | None = None
