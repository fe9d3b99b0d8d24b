"""Pure records and rules. Stdlib only."""
