"""The job store behind one interface, two backends (DESIGN §6): SQLite (``..jobstore``: embedded,
one server process) and PostgreSQL (``postgres``: one database shared by gateways and engines).
``interface`` states what both provide and opens the configured one; ``migrations`` versions both
schemas; ``bus`` carries new jobs and job events between processes over LISTEN/NOTIFY (PostgreSQL
only: with SQLite there is one process and events stay in it)."""
