"""Every knob of the service, from environment variables (``ONESTAGE_<NAME>``) or CLI flags (``--kebab-name``).

Flags win over the environment, which wins over the defaults below. List and object values are JSON, e.g.
``ONESTAGE_MODELS='[{"name": "meinst", "path": "model.onnx"}]'`` or ``--buckets '["256x256", "256x512"]'``.
``python -m service --help`` prints this list with the defaults.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inference.decode import DEFAULT_MAX_IMAGE_PIXELS
from inference.runtime import RuntimeOptions, default_cache_dir, usable_cores
from inference.tiling import DEFAULT_TILE_OVERLAP

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODELS = REPO / "models"
_BUCKET = re.compile(r"^(\d+)x(\d+)$")
_ORIGIN = re.compile(r"^https?://[^/\s]+$")


def parse_bucket(text: str) -> tuple[int, int]:
    """ "HxW" -> (H, W)."""
    match = _BUCKET.match(text.strip())
    if not match:
        raise ValueError(f"shape bucket {text!r} is not of the form HxW (e.g. 256x512)")
    return int(match[1]), int(match[2])


class ModelSpec(BaseModel):
    """One served model. ``path`` is a training checkpoint (``.pt``, exported to ONNX into ``cache_dir`` on
    start), an exported graph (``.onnx``) or a TensorRT engine (``.plan``/``.engine`` with its ``.json``
    sidecar); ``buckets`` overrides the global shape buckets for this model, ``runtime`` the service's
    runtime options (only the keys given, e.g. ``{"engine": "onnxruntime"}``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    path: Path
    buckets: list[str] | None = None
    runtime: dict[str, Any] = Field(default_factory=dict)

    @field_validator("buckets")
    @classmethod
    def _buckets_parse(cls, value: list[str] | None) -> list[str] | None:
        for bucket in value or []:
            parse_bucket(bucket)
        return value

    @field_validator("runtime")
    @classmethod
    def _runtime_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        RuntimeOptions.model_validate(value)  # unknown keys and bad values fail here, at start-up
        return value


def bundled_models() -> list[ModelSpec]:
    """The checkpoints committed under ``models/``: the HeLa nucleus MEInst and EmbedMask recipes."""
    return [
        ModelSpec(name="meinst", path=BUNDLED_MODELS / "meinst_nucleus" / "model.pt"),
        ModelSpec(name="embedmask", path=BUNDLED_MODELS / "embedmask_nucleus" / "model.pt"),
    ]


def _spare_cores() -> int:
    """Threads for the request steps around inference (decode, finishing): half the usable cores, rounded up."""
    return max(usable_cores() - usable_cores() // 2, 1)


def _finishing_threads() -> int:
    """Threads that may share one image's mask finishing: ``_spare_cores``, at most 4."""
    return min(_spare_cores(), 4)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ONESTAGE_",
        env_nested_delimiter="__",
        cli_prog_name="python -m service",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    models: list[ModelSpec] = Field(
        default_factory=bundled_models,
        description='served models, JSON [{"name", "path", "buckets"?}]; default: the bundled models/ checkpoints',
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="where checkpoints are exported to ONNX, TensorRT engines built and OpenVINO's model cache kept",
    )
    runtime: RuntimeOptions = Field(
        default_factory=RuntimeOptions,
        description="how every model runs unless its models entry overrides it (--runtime.engine, "
        "--runtime.precision, ...; ONESTAGE_RUNTIME__ENGINE=..., or ONESTAGE_RUNTIME='{\"engine\": ...}')",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="largest batch the batcher forms (1 turns batching off)")
    max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="longest wait of a batch's first request for others to join (0, Triton's default: none; "
        "batches still form from the requests that queue while the model runs)",
    )
    max_queue_size: int = Field(
        64, ge=1, description="requests waiting per model; beyond it requests get 503 + Retry-After"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="deadline from arrival; a request still waiting at its deadline gets 504"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503")
    buckets: list[str] = Field(
        default_factory=list,
        description="padded input shapes HxW shared by every model; empty: per model, the short test side by "
        "1, 4/3, 16/9 and the longest side ratios, both orientations",
    )
    max_body_bytes: int = Field(
        20 * 2**20, ge=1024, description="largest request body, checked while it streams in (413)"
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="largest decoded image (width x height), checked from the header (413)",
    )
    tile_overlap: int = Field(
        DEFAULT_TILE_OVERLAP,
        ge=0,
        description="input pixels shared by neighbouring tiles of an image larger than every bucket at the model's "
        "scale; at least the largest object, at most half the shortest bucket side",
    )
    cpu_workers: int = Field(
        default_factory=_spare_cores,
        ge=1,
        description="threads for decoding and mask finishing (default: half the usable cores, rounded up)",
    )
    finishing_threads: int = Field(
        default_factory=_finishing_threads,
        ge=1,
        le=64,
        description="threads that may share one image's mask finishing: its request thread plus helpers from a "
        "pool the process shares (default: half the usable cores, rounded up, at most 4)",
    )
    warmup: bool = Field(
        True, description="run every model on its warm buckets (batch 1 and max) before reporting ready"
    )
    warm_buckets: list[str] = Field(
        default_factory=list,
        description="shapes HxW every model runs before it reports ready; empty: every bucket, but on OpenVINO "
        "(one engine compiled per shape) the largest only, the others compiled on first use",
    )
    shutdown_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown: longest wait for in-flight requests")
    drain_s: float = Field(
        0.0,
        ge=0,
        description="after SIGTERM, readiness answers 503 this long while requests are still served (load balancers "
        "take the replica out), before the graceful shutdown; SIGINT and a second SIGTERM skip it",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    access_log: bool = Field(
        False, description="log every request: method, route, model, status, latency, bytes, client, key name, id"
    )
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or as JSON objects, one a line")
    api_keys_file: Path | None = Field(
        None,
        description="file of accepted API keys, one '[name:]key' or '[name:]sha256:<hex>' a line "
        "(python -m service.keys), "
        "re-read when it changes and on SIGHUP; with any key set, /segment, /display and the model metadata need "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="more accepted API keys, comma-separated, each as a line of api_keys_file; set it in the "
        "environment (ONESTAGE_API_KEYS), not as a flag: flags show in the process list",
    )
    metrics_require_key: bool = Field(
        False, description="/metrics needs an API key too (default: open to the Prometheus scraper)"
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description='origins whose pages may call the API, JSON ["https://host[:port]"] or ["*"]; '
        "empty: CORS off (same-origin)",
    )

    @field_validator("buckets", "warm_buckets")
    @classmethod
    def _buckets_parse(cls, value: list[str]) -> list[str]:
        for bucket in value:
            parse_bucket(bucket)
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_exact(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"CORS origin {origin!r} is not scheme://host[:port] (no path, no trailing '/'), nor '*'"
                )
        return value

    def runtime_options(self, spec: ModelSpec) -> RuntimeOptions:
        """``spec``'s runtime options: the service's, with the model's own overrides."""
        return RuntimeOptions.model_validate({**self.runtime.model_dump(), **spec.runtime})

    def model_buckets(self, spec: ModelSpec) -> list[tuple[int, int]] | None:
        """``spec``'s shape buckets, or the service's, or None (the model's defaults)."""
        texts = spec.buckets if spec.buckets is not None else self.buckets
        return [parse_bucket(text) for text in texts] or None

    def warm_shapes(self) -> list[tuple[int, int]]:
        """The shapes every model warms up on, as ``warm_buckets`` names them (empty: the engine's default)."""
        return [parse_bucket(text) for text in self.warm_buckets]

    @field_validator("models")
    @classmethod
    def _names_unique(cls, value: list[ModelSpec]) -> list[ModelSpec]:
        names = [spec.name for spec in value]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"models need distinct names and at least one entry, got {names}")
        return value


def environment_names() -> set[str]:
    """Every environment variable the settings read: ``ONESTAGE_<NAME>``, and ``ONESTAGE_RUNTIME__<OPTION>`` for
    each runtime option (deployment files are checked against it)."""
    names = {f"ONESTAGE_{name.upper()}" for name in Settings.model_fields}
    return names | {f"ONESTAGE_RUNTIME__{name.upper()}" for name in RuntimeOptions.model_fields}


def load_settings(argv: list[str] | None, prog: str = "python -m service") -> Settings:
    """Settings from the environment and ``argv`` (None: no CLI parsing, environment and defaults only); ``prog``
    is the command ``--help`` names."""
    return Settings(_cli_parse_args=argv, _cli_prog_name=prog) if argv is not None else Settings()
