"""The training process's side of graders: TRL reward functions and the model graders.

The grader specs and torch-free scoring are the contract's
(``trainers/contract/graders/``); ``reward`` wraps a grader as a TRL reward function
and ``model`` runs the graders that load a local model (``score_model``, cosine
similarity), which only the training process does.
"""
