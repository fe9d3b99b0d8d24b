"""SQLite state: connection, migrations, repositories. No business rules."""
