"""tuneloop: the product logic behind the Airflow DAGs (no Airflow imports in this package)."""

import os as _os

__version__ = "0.1.0"

# torch's OpenMP threads spin-wait between parallel regions by default. When another process
# holds a core (Postgres, the demo's client, an Airflow worker), a 2-thread decode step of
# SmolLM2 took 2.2 s instead of 0.23 s here: the spinning thread starves the one doing the work.
# Passive waiting costs little on an idle machine and avoids that cliff. Read by libgomp when
# torch loads, so it is set here, before any module of this package imports torch (all do so
# lazily). An explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Weights come from pip-installed packages (or a local folder), never from the Hugging Face Hub
# unless asked: set once here, before any module of this package (or serving/, which imports
# tasks.core) loads huggingface_hub, which reads it at import. HF_HUB_OFFLINE=0 in the
# environment wins.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
