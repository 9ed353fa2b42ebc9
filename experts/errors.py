"""Errors a user can mend: bad input (a wrong shape, an unknown router, a malformed file or request, a missing
value), as opposed to a fault in moa. ``moa`` prints these as one line; anything else keeps its traceback.

They subclass the builtin a caller would catch (``ValueError``, ``TypeError``), so ``except ValueError`` still
works. Defined in the leftmost layer so every layer can raise them.
"""


class UserError(ValueError):
    """A bad value from the user (config, data, checkpoint, bundle, request); the message names the problem."""


class UserTypeError(UserError, TypeError):
    """A value of the wrong type from the user."""
