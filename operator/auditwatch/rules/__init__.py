"""The rule language: parse (both Parseable forms and the extensions), print, evaluate.

`parse.parse_rule` turns an AuditAlert's rule into an `ast.Rule`; `evaluate.compile_rule` turns
its condition into a vectorised evaluator over event batches; `reference.matches` is the same
meaning, one event at a time, written for clarity rather than speed.
"""
