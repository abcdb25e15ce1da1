"""The training process's side of judges: judge objects that give P(A ≻ B).

The judge specs and their creation-time checks are the contract's
(``trainers/contract/judges/``); ``registry.build_judge`` builds a judge for
training, and ``models`` loads the sequence classifiers of the model judges.
"""
