"""Framework glue: :mod:`threaddispatch.contrib.flask` and :mod:`threaddispatch.contrib.django`.

Each module imports its framework, which is an optional extra (``threaddispatch[flask]``,
``threaddispatch[django]``); importing this package imports neither.
"""
