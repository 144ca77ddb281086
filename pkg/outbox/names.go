package outbox

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/treatyhq/treaty/internal/migrate"
)

// DefaultTable is the outbox table used when no name is configured.
const DefaultTable = "treaty_outbox"

// DefaultInboxTable is the inbox table used when no name is configured.
const DefaultInboxTable = "treaty_inbox"

// DefaultSlots is the number of key slots created by the migrations unless told otherwise.
const DefaultSlots = 256

// identRE keeps names to plain lower-case identifiers so that the derived names (suffixes,
// notification channel, setting names) stay valid and within PostgreSQL's 63-byte limit.
var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,39}$`)

// names holds every SQL name derived from one configured outbox table name.
type names struct {
	schema string // "" when the table is not schema-qualified
	base   string // the table name without schema
	source string // as configured, e.g. "app.outbox"; sent in the source header

	table, slots, relays, holds, dead, versions, notifyFn string // quoted
	channel                                               string // LISTEN channel (unquoted)
	setting                                               string // custom setting used by the trigger
}

func parseTableName(name string) (names, error) {
	if name == "" {
		name = DefaultTable
	}
	schema, base := "", name
	if i := strings.IndexByte(name, '.'); i >= 0 {
		schema, base = name[:i], name[i+1:]
		if !identRE.MatchString(schema) {
			return names{}, fmt.Errorf("outbox table %q: schema %q must match %s", name, schema, identRE)
		}
	}
	if !identRE.MatchString(base) {
		return names{}, fmt.Errorf("outbox table %q: table name %q must match %s", name, base, identRE)
	}
	q := func(suffix string) string {
		if schema == "" {
			return migrate.QuoteIdent(base + suffix)
		}
		return migrate.QuoteIdent(schema + "." + base + suffix)
	}
	n := names{
		schema:   schema,
		base:     base,
		source:   name,
		table:    q(""),
		slots:    q("_slot"),
		relays:   q("_relay"),
		holds:    q("_hold"),
		dead:     q("_dead"),
		versions: q("_migrations"),
		notifyFn: q("_notify"),
		channel:  name,
		setting:  "treaty_outbox." + strings.ReplaceAll(name, ".", "__"),
	}
	return n, nil
}

// replacer substitutes the placeholders used in the shipped SQL files.
func (n names) replacer(slots int) func(string) string {
	createSchema := ""
	if n.schema != "" {
		createSchema = "CREATE SCHEMA IF NOT EXISTS " + migrate.QuoteIdent(n.schema) + ";"
	}
	r := strings.NewReplacer(
		"{{create_schema}}", createSchema,
		"{{table}}", n.table,
		"{{slot_table}}", n.slots,
		"{{relay_table}}", n.relays,
		"{{hold_table}}", n.holds,
		"{{dead_table}}", n.dead,
		"{{notify_fn}}", n.notifyFn,
		"{{base}}", n.base,
		"{{channel}}", quoteLiteral(n.channel),
		"{{setting}}", quoteLiteral(n.setting),
		"{{slots}}", fmt.Sprint(slots),
	)
	return r.Replace
}

type inboxNames struct {
	schema, base, table, versions string
}

func parseInboxName(name string) (inboxNames, error) {
	if name == "" {
		name = DefaultInboxTable
	}
	schema, base := "", name
	if i := strings.IndexByte(name, '.'); i >= 0 {
		schema, base = name[:i], name[i+1:]
		if !identRE.MatchString(schema) {
			return inboxNames{}, fmt.Errorf("inbox table %q: schema %q must match %s", name, schema, identRE)
		}
	}
	if !identRE.MatchString(base) {
		return inboxNames{}, fmt.Errorf("inbox table %q: table name %q must match %s", name, base, identRE)
	}
	n := inboxNames{schema: schema, base: base, table: migrate.QuoteIdent(name), versions: migrate.QuoteIdent(name + "_migrations")}
	return n, nil
}

func (n inboxNames) replacer() func(string) string {
	createSchema := ""
	if n.schema != "" {
		createSchema = "CREATE SCHEMA IF NOT EXISTS " + migrate.QuoteIdent(n.schema) + ";"
	}
	return strings.NewReplacer("{{create_schema}}", createSchema, "{{table}}", n.table, "{{base}}", n.base).Replace
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
