"""Bus implementations: ``memory`` (embedded) and ``kafka`` (production)."""
