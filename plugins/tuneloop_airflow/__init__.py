"""Airflow-facing adapters for tuneloop: assets, default args, connections, callbacks, plugin.

Everything here is light: DAG files import it at parse time.
"""
