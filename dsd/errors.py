"""User-facing errors: the CLI prints their message in one paragraph and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config value, missing weights, unreadable file)."""

    exit_code = 2
