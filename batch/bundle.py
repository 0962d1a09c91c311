"""Everything a Spark platform needs to run the job, in one directory to upload:

    python -m batch.bundle [--model bank_churn:TAG] [--out dist/spark]

writes
    bank_churn_score.py        the main file for spark-submit (batch/submit.py)
    bank_churn_batch.zip       the code for --py-files: batch/ and models/ (nothing of serving or training)
    bank_churn-<version>.tar.gz  the model-store entry (`bentoml models export`), for --model-archive

The Python packages come from requirements/spark.txt (the job's image installs it); the
deploy/spark/README.md commands name these files.
"""

from __future__ import annotations

import argparse
import shutil
import zipfile
from pathlib import Path

from batch.shipping import export_from_store
from models.store import MODEL_TAG_ENV, served_tag

ROOT = Path(__file__).resolve().parent.parent
MAIN_FILE = "bank_churn_score.py"
CODE_ZIP = "bank_churn_batch.zip"
PACKAGES = ("batch", "models")  # what the driver and the executors import; models/ is shared


def code_zip(path: Path) -> list[str]:
    """Zip the packages' Python files (importable from the zip, as --py-files puts it on sys.path)."""
    names = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for package in PACKAGES:
            for source in sorted((ROOT / package).glob("*.py")):
                name = source.relative_to(ROOT).as_posix()
                archive.write(source, name)
                names.append(name)
    return names


def bundle(out: Path, model: str | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "batch" / "submit.py", out / MAIN_FILE)
    code_zip(out / CODE_ZIP)
    archive, _ = export_from_store(model or served_tag(), out)
    return {"main": out / MAIN_FILE, "code": out / CODE_ZIP, "model": archive}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"model-store tag (default: ${MODEL_TAG_ENV}, else bank_churn:latest)")
    p.add_argument("--out", type=Path, default=ROOT / "dist" / "spark")
    args = p.parse_args(argv)
    for role, path in bundle(args.out, args.model).items():
        print(f"{role:5} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
