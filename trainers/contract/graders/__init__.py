"""Graders: OpenAI-style reward specifications and the torch-free code that scores with them.

``spec`` holds the pydantic models (one per type in ``spec.GRADER_TYPES``) and the
checks a job or an API call runs on them; ``scoring`` scores samples with them (the
API's ``/graders/run`` runs it in a child with a deadline). Nothing here loads torch:
the graders that run a local model (``score_model``, cosine similarity) score through
``trainers/graders/model.py``, in the training process or an eval run's process, and a
TRL reward function is ``trainers/graders/reward.py``.

Modules: ``templates`` (``{{item.x}}``, ``{{sample.output_text}}``), ``expr``
(the multi grader's formula), ``text`` (torch-free metrics), ``judging`` (a generative
judge's prompt and how its answer is read), ``validate`` (the models a grader names,
checked at creation), ``remote`` (the ``endpoint`` grader: the user's HTTP service scores
each sample), ``judgeendpoints`` (the server's OpenAI-compatible judge endpoints and the
training-side client that asks them for a ``score_model`` or ``label_model``),
``python`` (OpenAI's ``python`` grader: the user's ``grade(sample, item)``, in the
bubblewrap sandbox of ``trainers.contract.sandbox``).
"""
