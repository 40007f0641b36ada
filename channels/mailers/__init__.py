"""Mailer implementations: ``outbox`` (embedded, a folder of .eml files) and ``smtp``."""
