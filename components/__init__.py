"""Pipeline stages as plain, typed Python: one module per DVC stage, no orchestration here."""
