"""The main file spark-submit runs for `python -m batch.spark` on Dataproc, EMR and the Spark
Operator (spark-submit takes a file, not a module); the code comes with it as --py-files
bank_churn_batch.zip. `python -m batch.bundle` writes both (this file as bank_churn_score.py).
"""

import sys

from batch.spark import main

if __name__ == "__main__":
    sys.exit(main())
