"""The model travels with the job: a model-store entry packed as an archive that Spark ships to
every node (`SparkContext.addArchive`, the API behind `--archives`), checked against the
SHA-256 recorded at training and loaded once per Python worker.

The archive is BentoML's own export of the entry (`bentoml models export TAG FILE.tar.gz`:
model.yaml and the entry's files), so the same file serves `bentoml models import`. The driver
reads and checks the entry once and sends its metadata with the tasks; each executor checks its
unpacked copy against that metadata (schema, threshold, every file's SHA-256) with
`models.store.check_model`, as `bentoml serve` checks the store, before it loads anything.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from models.predictor import Predictor, load_predictor
from models.store import MODEL_NAME, ModelLoadError, check_model

ARCHIVE_SUFFIX = ".tar.gz"  # Spark unpacks .tar.gz, .tgz, .tar and .zip archives


def archive_name(tag: str) -> str:
    """bank_churn:abc -> bank_churn-abc.tar.gz, the name `python -m batch.bundle` writes."""
    name, version = tag.split(":", 1)
    return f"{name}-{version}{ARCHIVE_SUFFIX}"


class UnpackedEntry:
    """A model-store entry unpacked from an archive, shaped like the `bentoml.Model` that
    `models.store.check_model` and `models.predictor.load_predictor` read (tag, info.metadata,
    info.creation_time, path_of): the same checks and loading, without BentoML installed."""

    def __init__(self, root: str | Path, tag: str, metadata: dict[str, Any], created: str):
        self.root = Path(root)
        self.tag = tag
        self.info = SimpleNamespace(metadata=metadata, creation_time=datetime.fromisoformat(created))

    def path_of(self, name: str) -> str:
        return str(self.root / name)


@dataclass(frozen=True)
class ShippedModel:
    """What the driver sends with every task: the entry's tag, the archive's name in SparkFiles,
    and the metadata it checked (with each file's SHA-256)."""

    tag: str
    alias: str
    created: str
    metadata: dict[str, Any] = field(repr=False)
    prefer_compiled: bool = True

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def backend(self) -> str:
        compiled = self.metadata.get("compiled", {})
        usable = self.prefer_compiled and compiled.get("enabled") and compiled.get("passed")
        return "onnxruntime" if usable else "sklearn"


def read_unpacked(root: str | Path) -> tuple[str, dict[str, Any], str]:
    """(tag, metadata, creation time) from an unpacked archive's model.yaml."""
    import yaml

    try:
        info = yaml.safe_load((Path(root) / "model.yaml").read_text())
        tag = f"{info['name']}:{info['version']}"
        created = info["creation_time"]
        metadata = dict(info["metadata"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{root} is not an exported model-store entry ({type(exc).__name__}: {exc}); make one with "
            f"`bentoml models export {MODEL_NAME}:TAG {MODEL_NAME}-TAG{ARCHIVE_SUFFIX}` or `python -m batch.bundle`"
        ) from None
    if info["name"] != MODEL_NAME:
        raise ModelLoadError(f"{root} holds model '{tag}', not a {MODEL_NAME} model")
    return tag, metadata, str(created if isinstance(created, str) else created.isoformat())


def export_from_store(tag: str, directory: str | Path | None = None) -> tuple[Path, str]:
    """Check a model-store entry (schema, threshold, hashes) and export it as an archive Spark
    can ship; returns (archive path, the resolved tag: `latest` becomes a version)."""
    import bentoml

    from models.store import get_stored

    model = get_stored(tag)
    check_model(model)
    resolved = str(model.tag)
    directory = Path(directory or tempfile.mkdtemp(prefix="bank-churn-model-"))
    path = directory / archive_name(resolved)
    if not path.exists():
        bentoml.models.export_model(resolved, str(path))
    return path, resolved


# One loaded predictor per Python worker and model: Spark reuses its Python workers between
# tasks (spark.python.worker.reuse, on by default), so a worker checks and loads a model once,
# not once per partition.
_LOADED: dict[tuple[str, str, bool], Predictor] = {}


def load_shipped(shipped: ShippedModel, root: str | Path) -> Predictor:
    """The predictor for a shipped model, from the archive unpacked at `root`: checked against the
    driver's metadata and loaded on this worker's first call, cached after."""
    key = (shipped.tag, shipped.alias, shipped.prefer_compiled)
    predictor = _LOADED.get(key)
    if predictor is None:
        entry = UnpackedEntry(root, shipped.tag, shipped.metadata, shipped.created)
        try:
            predictor = load_predictor(entry, prefer_compiled=shipped.prefer_compiled)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc} (the archive unpacked at {root})") from None
        _LOADED[key] = predictor
    return predictor


def loaded_models() -> tuple[tuple[str, str, bool], ...]:
    """Which models this process has loaded (what the tests ask a Python worker)."""
    return tuple(_LOADED)
