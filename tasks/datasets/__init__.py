"""The dataset library the curate and signals stages share: de-identification (`deid`), the Great
Expectations gate (`gate`) and immutable snapshots/exports (`export`). Imports the core only.
"""
