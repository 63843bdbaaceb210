"""CHAIR and POPE evaluation: COCO loading, metrics, resumable runners, comparison reports.

See docs/eval.md for the exact metric semantics. Submodules import their heavy dependencies
(NLTK, pycocotools, Ray, matplotlib, the model) only where needed.
"""
