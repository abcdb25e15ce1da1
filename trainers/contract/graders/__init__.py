"""Graders: OpenAI-style reward specifications and the torch-free code that scores with them.

``spec`` holds the pydantic models (one per type in ``spec.GRADER_TYPES``) and the
checks a job or an API call runs on them; ``scoring`` scores samples with them (the
API's ``/graders/run`` runs it in a child with a deadline). Nothing here loads torch:
the graders that run a local model (``score_model``, cosine similarity) score through
``trainers/graders/model.py``, in the training process only, and a TRL reward function
is ``trainers/graders/reward.py``.

Modules: ``templates`` (``{{item.x}}``, ``{{sample.output_text}}``), ``expr``
(the multi grader's formula), ``text`` (torch-free metrics).
"""
