"""The one error type users see: what went wrong, where, and how to fix it."""


class HbpcError(Exception):
    """A user-facing failure. The CLI prints ``str(error)`` and exits with status 2."""

    def __init__(self, what: str, where: str = "", fix: str = ""):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"  where: {where}")
        if fix:
            parts.append(f"  fix: {fix}")
        super().__init__("\n".join(parts))
