package store

// NumMigrations is how many migrations a new database applies, for the tests.
var NumMigrations = len(migrations)
