// Package migrations holds the coordinator's schema as numbered SQL files, embedded so that the
// binary carries them. Apply them with `coordinator migrate` or store/postgres.Migrate.
package migrations

import "embed"

// FS holds NNN_name.up.sql and NNN_name.down.sql.
//
//go:embed *.sql
var FS embed.FS
