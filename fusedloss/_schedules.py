"""Schedules: the ways a family can run the same math on the Triton backends (one HBM read per row or two, pointer
or tensor-descriptor loads, exact or fixed-shift softmax). A schedule is a field of the family's frozen options,
chosen by the public function's argument, with an environment variable only as the default, resolved once per
call and carried to the backward in the options, so the forward and backward of one call never disagree."""

import os


def resolve(argument, value, named, env):
    """The schedule a call runs: ``value`` (the argument named ``argument``: a name of ``named``, or an instance of
    the class of ``named``'s values, for families whose schedule is a set of features), or when it is None the
    name in the environment variable ``env``, or when that is unset or empty the first of ``named`` (the default).
    ValueError / TypeError naming the argument or the variable otherwise."""
    where = argument
    if value is None:
        value, where = os.environ.get(env, "") or next(iter(named)), env
    if isinstance(value, str):
        if value not in named:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, named))}, got {value!r}")
        return named[value]
    kind = type(next(iter(named.values())))
    if kind is not str and isinstance(value, kind):
        return value
    expected = "a str" if kind is str else f"a str or a {kind.__name__}"
    raise TypeError(f"{argument} must be {expected}, got {type(value).__name__}")
