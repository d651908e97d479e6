package store

// NumMigrations is how many migrations a new database applies, for the tests.
var NumMigrations = len(migrations)

// LimitMigrations makes Open migrate only up to version v until the returned function restores all,
// to build a database as an older flowstat left it.
func LimitMigrations(v int) (restore func()) {
	all := migrations
	migrations = migrations[:v]
	return func() { migrations = all }
}

// SchemaMarkdown is SCHEMA.md as schema_docs.go makes it.
var SchemaMarkdown = schemaMarkdown
