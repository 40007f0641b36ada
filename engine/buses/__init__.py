"""Bus implementations: ``memory`` (embedded, with the optional durable log of
``durable``) and ``kafka`` (production)."""
