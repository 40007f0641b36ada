"""Admin UI routes, one module per area."""
