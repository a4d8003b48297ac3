"""Indexing on a Ray cluster: another executor of the indexer's decode -> encode stage.

The driver plans (scan + diff) and commits against SQLite exactly as a local run does
(mmsearch.indexing.pipeline); Ray actors only decode and encode. The work is recorded as pending in the
catalog before anything is sent, and each result batch is committed with its pending rows removed in
one transaction, so a killed driver resumes by re-running the same command. Ray is imported only
when an executor runs (`pip install 'mmsearch[ray]'`).
"""
from mmsearch.distributed.executor import RayExecutor  # noqa: F401  (imports no Ray)
