"""The ``judge:`` section: the rule-based verifier or an LLM judge behind an OpenAI-compatible endpoint."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from pipeline.settings.base import ConfigError, StageParams, Strict
from pipeline.settings.pairs import PairsParams


class JudgePrice(Strict):
    """US dollars per 1,000 tokens; only used for the estimated cost in metrics and the dry run."""

    input_per_1k: float = Field(ge=0)
    output_per_1k: float = Field(ge=0)


class JudgeServeParams(Strict):
    """A model the judge serves itself with vLLM's OpenAI-compatible server (``judge.llm.serve``); what
    it computes with: part of the judge's DVC params."""

    # A local model folder (e.g. models/policy), a builtin name, or hf:<org>/<name> (its safetensors
    # from the Hugging Face cache, downloaded if missing and the network allows). Checked when served.
    model: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"]  # auto: the dtype in the model's config


class JudgeServerParams(Strict):
    """How the judge's own vLLM server runs (``judge.server``, used when ``judge.llm.serve`` is set). Not
    a DVC param: changing it reruns nothing."""

    tensor_parallel_size: int = Field(ge=1)  # GPUs of the server
    gpu_memory_utilization: float = Field(gt=0, le=1)  # GPUs only
    max_model_len: int = Field(ge=16)  # judge prompt + answer, tokens; a longer request fails
    max_num_seqs: int = Field(ge=1)  # sequences per engine step
    enforce_eager: bool  # false: torch.compile (faster on GPUs, slow to start on small CPUs)
    cpu_kvcache_space_gb: float = Field(gt=0)  # CPU build only (VLLM_CPU_KVCACHE_SPACE)
    block_size: int | None = Field(ge=1)  # KV-cache block, tokens (null: vLLM's own); a multiple of 32 on CPU
    startup_timeout_s: float = Field(gt=0)  # model load (and download); not healthy by then: the stage fails


class LLMJudgeParams(Strict):
    """An LLM judge behind any OpenAI-compatible Chat Completions endpoint (see pipeline/judging/llm/)."""

    # rubric: every candidate scored 1-5 on its own; listwise: the N candidates shown together (in a
    # seeded shuffled order), the judge names the best and the worst.
    mode: Literal["rubric", "listwise"]
    model: str
    base_url: str | None  # None: OpenAI (or the server of ``serve``); e.g. http://localhost:8000/v1
    # None: the endpoint of base_url. Else the stage that judges serves this model itself (started on
    # its first request to send, stopped when it is done) as "<model>@<fingerprint of its weights>".
    serve: JudgeServeParams | None
    # The NAME of the environment variable that holds the key, never the key; null: no key (a local
    # server without auth).
    api_key_env: str | None
    show_reference: bool  # show the gold final answer to the judge
    temperature: float = Field(ge=0, le=2)
    max_tokens: int = Field(ge=1)
    timeout_s: float = Field(gt=0)  # per HTTP attempt; a timeout is retried by the client
    max_in_flight: int = Field(ge=1)  # concurrent requests
    max_retries: int = Field(ge=0)  # client retries on 408/409/429/5xx/timeouts (backoff, jitter, Retry-After)
    max_parse_retries: int = Field(ge=0)  # extra requests after a malformed answer, then a failure
    # A group with a failed candidate: drop_group (status failed) or ignore_failed (judge the group on
    # the candidates that got a score; failed if fewer than 2). Listwise failures fail the whole group.
    on_failure: Literal["drop_group", "ignore_failed"]
    # Abort (no outputs, answers kept in the cache) when more than this share of requests failed.
    max_failed_fraction: float = Field(ge=0, le=1)
    seed: int  # shuffle of the candidate order shown to the judge (listwise)
    structured_output: bool  # ask for a JSON schema; falls back to plain text if the server refuses
    prices: dict[str, JudgePrice]  # model -> price
    # Answer cache, outside every DVC output so that `dvc repro` never deletes it. A relative path is
    # taken from the repository root (also from a `dvc exp run --temp`/queue workspace under
    # .dvc/tmp/exps, which is resolved back to the main repository); the environment variable
    # DPO_JUDGE_CACHE, or an absolute path here, overrides it.
    cache_dir: str
    dry_run: bool  # print the number of requests and estimated tokens, send nothing
    # The OpenAI Batch API (pipeline/judging/llm/batch.py): the requests go up as one JSONL file and come
    # back within its 24 h window, at a lower price; false: one request at a time.
    batch: bool
    batch_poll_s: float = Field(gt=0)  # seconds between two status checks of a submitted batch
    # How long one run waits for its batches; the batches keep running after it, and a rerun resumes them.
    batch_timeout_s: float = Field(gt=0)
    batch_price_factor: float = Field(gt=0, le=1)  # batch price as a share of `prices`

    @model_validator(mode="before")
    @classmethod
    def _key_env_is_a_name(cls, data: Any) -> Any:
        # Checked on the whole mapping so that a pasted key is never echoed in the error message.
        name = data.get("api_key_env") if isinstance(data, dict) else None
        if name is not None and not (
            isinstance(name, str) and name.isascii() and name.isidentifier() and len(name) <= 128
        ):
            raise ValueError(
                "api_key_env must be the name of an environment variable (e.g. OPENAI_API_KEY), not the key itself"
            )
        return data

    @model_validator(mode="after")
    def _one_endpoint(self) -> Self:
        if self.serve is not None and self.base_url is not None:
            raise ConfigError(
                "judge.llm.serve: the judge serves its model itself, so judge.llm.base_url must be null "
                f"(got {self.base_url!r}); or set judge.llm.serve to null to use the server at base_url"
            )
        return self


class JudgeParams(Strict):
    backend: Literal["rule", "llm"]
    # Minimum score gap between best and worst; groups below it count as ties and are dropped.
    min_gap: float = Field(gt=0)
    llm: LLMJudgeParams
    server: JudgeServerParams


class JudgedPairs(StageParams):
    """The pairs and the judge that scores their candidates, which must agree on the scenario."""

    pairs: PairsParams
    judge: JudgeParams

    @model_validator(mode="after")
    def _scenario_has_scores(self) -> Self:
        if self.pairs.scenario == 3 and self.judge.backend == "llm" and self.judge.llm.mode == "listwise":
            raise ConfigError(
                "pairs.scenario: scenario 3 compares the policy's best with the other model's worst "
                "across two judged groups, which needs absolute scores: use judge.backend rule or "
                "judge.llm.mode rubric"
            )
        return self
