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

// ControlTable carries walhook's control changes (subscription changes,
// dead-letter replays, recovered rows) through the publication. Only its owner
// may insert: what arrives from it is trusted, and logical messages with the
// control prefixes are not (docs/security.md).
var ControlTable = Table{Schema: "walhook", Name: "control"}

// Kinds of walhook.control rows.
const (
	ControlSubscription = "subscription" // body: {"op":"upsert","row":{...}} or {"op":"delete","id":"..."}
	ControlReplay       = "replay"       // body: {"subscription","webhook_id","event"}
	ControlRecover      = "recover"      // body: an outbox event (ID, Type, ...)
)

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
// control table, the outbox table (only when it is the default walhook.outbox),
// walhook.emit (with EXECUTE only for EmitRoles when they are set), the
// insert-only publication of both tables and the slot. Every statement is
// idempotent, and upgrades an older install; the slot is created last and
// outside any transaction. The walhook schema must exist. serverVersion is
// the server's server_version_num, 0 when not known (then the slot statement
// is for psql: see slotSQL).
func SetupSQL(cfg Config, serverVersion int) []string {
	cfg = cfg.WithDefaults()
	stmts := []string{`CREATE TABLE IF NOT EXISTS walhook.control (
  id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  kind       text        NOT NULL,
  body       jsonb       NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
)`,
		// Insert-only, and only for its owner (the role that ran setup):
		// whoever may insert here may change walhook's routing.
		`REVOKE ALL ON walhook.control FROM PUBLIC`,
	}
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
	stmts = append(stmts, emitGrantSQL(cfg.EmitRoles)...)
	pub := pgx.Identifier{cfg.Publication}.Sanitize()
	addTable := func(t Table) string {
		return fmt.Sprintf(`
  IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = %[1]s AND schemaname = %[2]s AND tablename = %[3]s) THEN
    ALTER PUBLICATION %[4]s ADD TABLE %[5]s;
  END IF;`, quoteLiteral(cfg.Publication), quoteLiteral(t.Schema), quoteLiteral(t.Name), pub, t.Sanitize())
	}
	stmts = append(stmts, fmt.Sprintf(`DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = %[1]s) THEN
    CREATE PUBLICATION %[2]s FOR TABLE %[3]s, %[4]s WITH (publish = 'insert');
  END IF;%[5]s%[6]s
END
$do$`, quoteLiteral(cfg.Publication), pub, cfg.Table.Sanitize(), ControlTable.Sanitize(), addTable(cfg.Table), addTable(ControlTable)))
	return append(stmts, slotSQL(cfg.Slot, cfg.SlotFailover, serverVersion))
}

// slotSQL creates the slot unless it exists, as a failover slot (the fifth
// argument of pg_create_logical_replication_slot, PostgreSQL 17+) when mode
// and the server's version (server_version_num) say so. With version 0 (not
// known: `setup --dry-run`) and FailoverAuto the choice is left to psql, which
// runs the dry-run's SQL: older servers have no five-argument function to
// parse, and a slot created inside a DO block trips PostgreSQL 17's snapshot
// bookkeeping ("snapshot reference ... is not owned by resource owner").
func slotSQL(slot, mode string, version int) string {
	create := func(failover bool) string {
		args := quoteLiteral(slot) + ", 'pgoutput'"
		if failover {
			args += ", false, false, true"
		}
		return fmt.Sprintf(`SELECT pg_create_logical_replication_slot(%s)
 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)`, args, quoteLiteral(slot))
	}
	switch {
	case mode == FailoverOff:
		return create(false)
	case mode == FailoverOn || version >= FailoverSlotVersion:
		return create(true)
	case version > 0:
		return create(false)
	}
	return fmt.Sprintf(`SELECT current_setting('server_version_num')::int >= %d AS walhook_failover_slots \gset
\if :walhook_failover_slots
%s;
\else
%s;
\endif`, FailoverSlotVersion, create(true), create(false))
}

// CheckFailover refuses slot_failover: true on a server without failover
// slots (version is its server_version_num).
func CheckFailover(mode string, version int) error {
	if mode == FailoverOn && version < FailoverSlotVersion {
		return fmt.Errorf("slot_failover: true needs PostgreSQL 17 or newer (failover slots); this server is %s: "+
			"set slot_failover: auto or false", versionString(version))
	}
	return nil
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

// emitSignature names walhook.emit in GRANT and REVOKE.
const emitSignature = "walhook.emit(text, text, jsonb, text)"

// emitGrantSQL limits EXECUTE on walhook.emit to roles: revoked from PUBLIC and
// from every other role that holds it (but its owner), granted to roles, with
// USAGE on the schema so that they can call it. No roles: PostgreSQL's default
// (EXECUTE for PUBLIC) or whatever was granted before stays.
func emitGrantSQL(roles []string) []string {
	if len(roles) == 0 {
		return nil
	}
	lits := make([]string, len(roles))
	ids := make([]string, len(roles))
	for i, r := range roles {
		lits[i], ids[i] = quoteLiteral(r), pgx.Identifier{r}.Sanitize()
	}
	return []string{
		fmt.Sprintf(`DO $do$
DECLARE
  r record;
  missing text;
BEGIN
  SELECT string_agg(n, ', ') INTO missing FROM unnest(ARRAY[%[2]s]::text[]) n
   WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = n);
  IF missing IS NOT NULL THEN
    RAISE EXCEPTION 'emit_roles: no such role: %%', missing;
  END IF;
  REVOKE EXECUTE ON FUNCTION %[1]s FROM PUBLIC;
  FOR r IN SELECT a.grantee::regrole::text AS name
             FROM pg_proc p, aclexplode(p.proacl) a
            WHERE p.oid = '%[1]s'::regprocedure AND a.privilege_type = 'EXECUTE'
              AND a.grantee <> 0 AND a.grantee <> p.proowner
              AND NOT a.grantee = ANY (ARRAY[%[2]s]::regrole[]) LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %[1]s FROM %%s', r.name);
  END LOOP;
END
$do$`, emitSignature, strings.Join(lits, ", ")),
		`GRANT USAGE ON SCHEMA walhook TO ` + strings.Join(ids, ", "),
		`GRANT EXECUTE ON FUNCTION ` + emitSignature + ` TO ` + strings.Join(ids, ", "),
	}
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
