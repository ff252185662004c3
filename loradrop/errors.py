"""The one error type a user ever sees: a sentence that says what is wrong and what to do."""


class UserError(Exception):
    """A problem the user can fix. The CLI prints its message alone, without a traceback."""
