"""Pages whose figures are generated from JSON, never typed by hand.

A figure typed into a page goes stale the moment the code or the data changes; a page rendered from the
JSON a stage or a benchmark wrote stays true, and a test fails when it was not regenerated.
``python -m pipeline.pages`` writes every page; ``python -m pipeline.pages --check`` exits 1 naming each
page that differs from what its JSON gives (:mod:`pipeline.pages.build`).
"""
