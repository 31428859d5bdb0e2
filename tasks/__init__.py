"""Prefect tasks wrapping the merging library, one file per pipeline step.

The pipeline steps (download, plan, prepare_output, merge_layer, finalize, evaluate, register) arrive with the
pipeline issue; the merge core they wrap lives in `merging/`.
"""
