"""Results database: ORM models, engine and session scope, schema check, writes."""
