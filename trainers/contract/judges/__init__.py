"""Judges: pairwise preferences P(A ≻ B) for online preference methods (EGPO).

A judge answers "how likely is completion A preferred to completion B for this
prompt". ``spec`` holds the pydantic models (a union on ``type``: a local
pairwise ``preference_model``, a ``reward_model`` turned into Bradley–Terry
probabilities, any ``grader``, and the rule-based ``pattern_table``);
``validate`` runs the torch-free checks the API does at job creation;
``registry`` builds a judge object for the training process. Importing
``spec`` or ``validate`` never loads torch; model judges import torch inside
``trainers.judges.models``, in training only.
"""
