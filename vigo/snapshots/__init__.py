"""What consumes the state's stream (``vigo.state``): the archive (layout, archiver, targets),
restore from it, and backups."""
