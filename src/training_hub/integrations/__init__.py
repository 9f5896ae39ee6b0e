"""Optional integrations (experiment loggers); each imports its package only when a run asks for it."""
