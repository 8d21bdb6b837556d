"""Metric modules shipped with finetune, so that evaluation works without the Hub.

Each file is an `evaluate` metric module, loaded with `evaluate.load(path)`; see
finetune/evaluation.py. They compute with scikit-learn, as the Hub's versions do.
"""
