"""fabric: a simulated NetBackup-style backup fabric for data-in-transit encryption."""
