"""Errors raised by the dataset loaders."""


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not on disk. hbpc never downloads; the message says what to do."""


class CorruptDataFile(ValueError):
    """A dataset file exists but cannot be parsed (bad magic, truncated, wrong contents)."""
