"""Tasks: where the prompts and rewards of a kind of text-generation problem live.

- :mod:`textgym.tasks.sentiment`: the default task of ``TextGen-v0``, continuing human-written
  movie-review openings (:func:`~textgym.tasks.sentiment.movie_review_prompts`) towards positive
  sentiment (the reward models of :mod:`textgym.rewards`);
- :mod:`textgym.tasks.reasoning`: reasoning-gym's procedural tasks (arithmetic, counting, puzzles)
  in chat mode, scored by each task's own verifier (``TextGen-Reasoning-v0``);
- :mod:`textgym.tasks.synthetic`: sanity tasks with programmatic rewards and a known optimum
  (``TextGen-Keyword-v0``, ...).

Importing this package imports no task (and neither torch nor transformers).
"""
