"""Runtime settings: one object, read once from BANKCHURN_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.store import MODEL_NAME


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BANKCHURN_", extra="ignore")

    model_tag: str = Field(f"{MODEL_NAME}:latest", description="model-store tag to serve")
    use_compiled: bool = Field(True, description="serve the ONNX model when its parity check passed")
    inference_threads: int = Field(1, ge=1, le=64, description="threads running predictions")
    runtime_threads: int = Field(1, ge=1, le=64, description="intra-op threads of the compiled runtime")
    max_batch_rows: int = Field(10_000, ge=1, le=1_000_000, description="row limit of /predict_batch")
    micro_batch_rows: int = Field(256, ge=1, le=10_000, description="largest coalesced /predict batch")
    max_queue: int = Field(256, ge=1, description="queued predictions beyond which requests get 503")
    explain_threads: int = Field(1, ge=1, le=16, description="threads computing explanations (own pool)")
    max_explain_queue: int = Field(16, ge=1, description="queued explanations beyond which requests get 503")
    request_timeout_s: float = Field(10.0, gt=0, description="per-request timeout (504 after it)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="CSV uploads above this get 413")
    max_csv_rows: int = Field(200_000, ge=1, description="row limit of a CSV scoring job")
    predict_route: Literal["hot", "bentoml"] = Field(
        "hot",
        description="who answers POST /predict over HTTP: the hot route in front of BentoML's middleware, "
        "or BentoML's own API machinery (the same model and answers, ~4x the per-request cost)",
    )
    access_log: str = Field(
        "errors",
        pattern=r"^(errors|all|off|0(\.\d+)?|1(\.0+)?)$",
        description="access log of every route: errors (status >= 400), all, off, or a sampling rate such as 0.01",
    )
    otel_exporter: Literal["none", "console", "otlp"] = Field("none", description="where tracing spans go")
