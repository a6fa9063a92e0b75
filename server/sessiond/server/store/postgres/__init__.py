"""PostgreSQL adapter: several sessiond replicas share one database."""
