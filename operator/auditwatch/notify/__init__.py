"""Delivering alert notices to webhooks, Slack and Alertmanager."""

from auditwatch.notify.delivery import DeliveryError, DeliveryRecord, Notifier, RetryPolicy

__all__ = ["DeliveryError", "DeliveryRecord", "Notifier", "RetryPolicy"]
