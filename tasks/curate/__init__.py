"""Curation: filters, the Great Expectations gate and the immutable dataset snapshot.
`tasks.curate.stage.curate` is what the curate_dataset DAG calls.
"""
