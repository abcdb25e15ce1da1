"""Graders: OpenAI-style reward specifications and the code that scores with them.

``spec`` holds the pydantic models (one per type in ``trainers.methods.GRADERS``)
and the checks a job or an API call runs on them; ``registry`` scores samples
with them and turns one into a TRL reward function. Importing this package, or
``spec`` and ``registry``, never loads torch: only ``model`` (score_model,
cosine similarity) does, inside its functions, in the training process.

Modules: ``templates`` (``{{item.x}}``, ``{{sample.output_text}}``), ``expr``
(the multi grader's formula), ``text`` (torch-free metrics), ``model``.
"""
