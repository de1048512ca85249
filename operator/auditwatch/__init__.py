"""auditwatch: Kubernetes audit events in, alerts out.

The package is laid out along the pipeline an audit event travels:

    decode (request bodies -> event dicts) -> normalise (event dicts -> Arrow batch)
    -> rules (parse, evaluate over batches) -> ...
"""

__version__ = "0.1.0"
