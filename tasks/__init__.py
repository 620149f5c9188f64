"""tuneloop: the product logic behind the Airflow DAGs (no Airflow imports in this package)."""

__version__ = "0.1.0"
