"""Indexing: scan folders, plan the diff against the catalog, decode, encode, commit.

scan.py walks and stats files; pipeline.py plans and runs the local executor of the one pipeline
(plan -> decode -> encode -> commit); corpus.py embeds and stores the text corpus.
"""
