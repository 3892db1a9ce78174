package cdc

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Table is a schema-qualified table name.
type Table struct{ Schema, Name string }

// DefaultTable is the outbox table `walhook setup` creates.
var DefaultTable = Table{Schema: "walhook", Name: "outbox"}

func (t Table) String() string { return t.Schema + "." + t.Name }

// Sanitize quotes t for SQL.
func (t Table) Sanitize() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

// ParseTable reads "schema.table" (or "table", in schema public).
func ParseTable(s string) (Table, error) {
	schema, name, ok := strings.Cut(s, ".")
	if !ok {
		schema, name = "public", s
	}
	if schema == "" || name == "" || strings.Contains(name, ".") {
		return Table{}, fmt.Errorf("%q is not a table name (want schema.table)", s)
	}
	return Table{Schema: schema, Name: name}, nil
}

var nameRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// ValidName reports whether s can name a slot or publication: lower-case letters,
// digits and underscores, as replication slot names must be.
func ValidName(s string) bool { return nameRE.MatchString(s) }

// SetupSQL returns the statements that create walhook's source objects: the
// outbox table (only when it is the default walhook.outbox), walhook.emit, the
// insert-only publication and the slot. Every statement is idempotent; the slot
// is created last and outside any transaction. The walhook schema must exist.
func SetupSQL(cfg Config) []string {
	cfg = cfg.WithDefaults()
	var stmts []string
	if cfg.Table == DefaultTable {
		stmts = append(stmts, `CREATE TABLE IF NOT EXISTS walhook.outbox (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event       text        NOT NULL,
  resource_id text,
  tenant      text,
  payload     jsonb       NOT NULL DEFAULT '{}',
  created_at  timestamptz NOT NULL DEFAULT now()
)`)
	}
	stmts = append(stmts, `CREATE OR REPLACE FUNCTION walhook.emit(event text, resource_id text, payload jsonb, tenant text DEFAULT NULL)
RETURNS pg_lsn
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
  IF event IS NULL OR event = '' THEN
    RAISE EXCEPTION 'walhook.emit: event must not be empty';
  END IF;
  RETURN pg_logical_emit_message(true, `+quoteLiteral(MessagePrefix)+`, jsonb_build_object(
    'event', event, 'resource_id', resource_id, 'tenant', tenant,
    'payload', coalesce(payload, '{}'::jsonb))::text);
END
$fn$`)
	pub := pgx.Identifier{cfg.Publication}.Sanitize()
	stmts = append(stmts, fmt.Sprintf(`DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = %[1]s) THEN
    CREATE PUBLICATION %[2]s FOR TABLE %[3]s WITH (publish = 'insert');
  ELSIF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = %[1]s AND schemaname = %[4]s AND tablename = %[5]s) THEN
    ALTER PUBLICATION %[2]s ADD TABLE %[3]s;
  END IF;
END
$do$`, quoteLiteral(cfg.Publication), pub, cfg.Table.Sanitize(), quoteLiteral(cfg.Table.Schema), quoteLiteral(cfg.Table.Name)))
	stmts = append(stmts, fmt.Sprintf(`SELECT pg_create_logical_replication_slot(%[1]s, 'pgoutput')
 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %[1]s)`, quoteLiteral(cfg.Slot)))
	return stmts
}

// TeardownSQL returns the statements that drop the slot and the publication.
// The slot goes first: a forgotten slot pins WAL forever.
func TeardownSQL(cfg Config) []string {
	cfg = cfg.WithDefaults()
	return []string{
		fmt.Sprintf(`SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()`,
			quoteLiteral(cfg.Slot)),
		`DROP PUBLICATION IF EXISTS ` + pgx.Identifier{cfg.Publication}.Sanitize(),
	}
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
