"""The one error type for bad input: its message names the file, row and field."""


class DataError(ValueError):
    """Bad or missing input data. The message says where (file, row, field) and what is wrong."""
