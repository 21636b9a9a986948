"""Rule kinds -> per-stage handlers: each stage keeps one table {rule kind: handler} and looks rules up here."""


def handler(table: dict, rule, what: str):
    """The handler ``table`` registers for the rule's kind (its class or the nearest base class in the table)."""
    for kind in type(rule).__mro__:
        if kind in table:
            return table[kind]
    raise TypeError(f"no {what} for rule {rule!r}")
