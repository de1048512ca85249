"""The Kubernetes front end: `auditwatch run`, kopf plus the receiver in one process.

Only this package imports kopf. `source` turns cached resource dicts into the configuration
model (testable without kopf); `handlers` feeds it from kopf; `writer` patches status and posts
Events; `leader` elects the one replica that reconciles; `operator` wires it all together.
"""
