"""One exception type for user errors: the CLI prints its message on one line, exit 2."""


class EigenError(Exception):
    """Bad input or an unsupported setting; the message says what was wrong and what is accepted."""
