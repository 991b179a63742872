"""Sweep results -> fitted learning-rate power law -> predicted peak LR.

Pure numpy / scikit-learn. Data flows ``data`` (runs) -> ``optimum`` (eta* per group) -> ``fit``
(Huber power law, CV, bootstrap, collinearity) -> ``lawfile`` (JSON) -> ``predict``.
"""
