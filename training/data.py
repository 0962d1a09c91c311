"""Load the raw CSV, validate it against the feature schema, split it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from models.schema import FEATURE_NAMES, TARGET, DataValidationError, validate_frame

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "Churn_Modelling.csv"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_data(path: Path | str = DEFAULT_DATA) -> pd.DataFrame:
    """Read and validate the dataset. Raises DataValidationError (never drops rows)."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError([f"data file not found: {path}"])
    try:
        raw = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataValidationError([f"cannot parse {path.name} as CSV: {exc}"]) from exc
    return validate_frame(raw)


@dataclass(frozen=True)
class Splits:
    """Stratified train / validation / test frames (features + target)."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    @staticmethod
    def xy(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
        return frame[list(FEATURE_NAMES)], frame[TARGET]


def stratify_split(df: pd.DataFrame, test_size: float, validation_size: float, seed: int) -> Splits:
    """Hold out a test split (never used for any decision) and a validation split (used
    only to choose the decision threshold); the model is fitted on the rest."""
    rest, test = train_test_split(df, test_size=test_size, stratify=df[TARGET], random_state=seed)
    val_share = validation_size / (1.0 - test_size)
    train, validation = train_test_split(rest, test_size=val_share, stratify=rest[TARGET], random_state=seed)
    return Splits(train=train, validation=validation, test=test)


def development_part(splits: Splits) -> pd.DataFrame:
    """Everything but the test split (train + validation): where tuning and cross-validation
    run, so the test split stays untouched until the final, single evaluation."""
    return pd.concat([splits.train, splits.validation])
