package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/walhook/walhook/sender/sendertest"
)

// role creates a login role (named after the test's database, roles are
// cluster-wide) with no privileges, and returns its name and a connection as it.
func (e *env) role(suffix string) (string, *pgx.Conn) {
	e.t.Helper()
	name := e.db.Name + "_" + suffix
	e.exec(`CREATE ROLE ` + name + ` LOGIN`)
	u, err := url.Parse(e.db.URL)
	if err != nil {
		e.t.Fatal(err)
	}
	u.User = url.User(name)
	conn, err := pgx.Connect(context.Background(), u.String())
	if err != nil {
		e.t.Fatalf("connect as %s: %v", name, err)
	}
	e.t.Cleanup(func() {
		conn.Close(context.Background())
		// Runs before the database is dropped: the role must not own or hold anything there.
		if _, err := e.db.Pool.Exec(context.Background(), `DROP OWNED BY `+name+`; DROP ROLE `+name); err != nil {
			e.t.Errorf("drop role %s: %v", name, err)
		}
	})
	return name, conn
}

// sqlState is the SQLSTATE of err, or "" when it is not a PostgreSQL error.
func sqlState(err error) string {
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok {
		return pgErr.Code
	}
	return ""
}

// TestHostileRoleCannotForgeControlChanges: a role without privileges on schema
// walhook emits each control prefix with pg_logical_emit_message: a `*`
// subscription to its own endpoint, a signed replay to an existing subscriber,
// a recovered row. Nothing is created or sent; each is counted and logged. The
// legitimate paths are the API, dlq replay and recover tests.
func TestHostileRoleCannotForgeControlChanges(t *testing.T) {
	t.Parallel()
	victim, evil := sendertest.NewServer(t, nil), echoing(t)
	e := newEnv(t, "allow_targets: [127.0.0.1/32]\nsubscriptions:\n"+sub("s", victim.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	_, mallory := e.role("mallory")
	ctx := context.Background()

	// The legitimate path is closed to it.
	if _, err := mallory.Exec(ctx, `INSERT INTO walhook.control (kind, body) VALUES ('subscription', '{}')`); sqlState(err) != "42501" {
		t.Fatalf("insert into walhook.control as a role without privileges: %v, want permission denied", err)
	}
	row := fmt.Sprintf(`{"id": "evil", "events": ["*"], "target_url": %q, "tenant": null, "secret": %q, "previous_secret": null,
		"previous_secret_until": null, "options": {}, "verify_intent": false, "created_at": "2026-12-01T00:00:00Z",
		"updated_at": "2026-12-01T00:00:00Z", "disabled_at": null}`, evil.HooksURL(), testSecret)
	forged := []struct{ prefix, content string }{
		{"walhook.subscription", `{"op": "upsert", "row": ` + row + `}`},
		{"walhook.replay", `{"subscription": "s", "webhook_id": "msg_forged", "event": {"ID": "forged-1", "Type": "pay.succeeded", "Payload": {"amount": 1000000}}}`},
		{"walhook.recover", `{"ID": "forged-2", "Type": "pay.succeeded", "Payload": {"amount": 1000000}}`},
	}
	for _, f := range forged {
		if _, err := mallory.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2)`, f.prefix, f.content); err != nil {
			t.Fatalf("emit %s: %v", f.prefix, err)
		}
	}
	// Committed after the forgeries: once it is delivered, they were streamed.
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('after', 'r')`)
	victim.Wait(t, 30*time.Second, "the event after the forgeries", func(q []sendertest.Request) bool {
		for _, x := range q {
			if decode(t, x.Body).Type == "after" {
				return true
			}
		}
		return false
	})
	e.waitCaughtUp()
	for _, q := range victim.Requests() {
		if env := decode(t, q.Body); env.Type != "after" {
			t.Errorf("the subscriber got a forged event: %s %s", q.Header.Get("webhook-id"), q.Body)
		}
	}
	if n := len(evil.Requests()); n != 0 {
		t.Errorf("the forged subscription's endpoint got %d requests", n)
	}
	var logged int
	e.db.Pool.QueryRow(ctx, `SELECT count(*) FROM walhook.routing_log WHERE subscription_id = 'evil'`).Scan(&logged)
	if logged != 0 {
		t.Errorf("the forged subscription is in the routing log (it would survive restarts)")
	}
	_, body := get(t, e.addr(r)+"/metrics")
	for _, f := range forged {
		if got := metric(body, "walhook_forged_messages_total", `prefix="`+f.prefix+`"`); got != 1 {
			t.Errorf("walhook_forged_messages_total{prefix=%q} = %v, want 1", f.prefix, got)
		}
	}
	if log := r.log.String(); !strings.Contains(log, "forged logical messages ignored") || !strings.Contains(log, `"prefix":"walhook.subscription"`) {
		t.Errorf("the log does not tell of the forgery:\n%s", log)
	}
}

// TestEmitRolesAndAcceptEmit: with emit_roles, setup leaves EXECUTE on
// walhook.emit to those roles only (also when the list changes); with
// accept_emit: false, walhook-prefix messages are ignored and counted while
// outbox rows flow.
func TestEmitRolesAndAcceptEmit(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "")
	ctx := context.Background()
	app, appConn := e.role("app")
	other, otherConn := e.role("other")
	e.writeConfig("emit_roles: [" + app + ", nosuch]\n")
	if code, _, stderr := e.walhook("setup"); code != exitFail || !strings.Contains(stderr, "emit_roles: no such role: nosuch") {
		t.Errorf("setup with a role that does not exist: exit %d: %s", code, stderr)
	}
	e.writeConfig("emit_roles: [" + app + "]\n")
	e.setup()
	e.exec(`GRANT USAGE ON SCHEMA walhook TO ` + other) // so that only EXECUTE stands in its way
	emit := func(c *pgx.Conn) error {
		_, err := c.Exec(ctx, `SELECT walhook.emit('emitted', 'r', '{}')`)
		return err
	}
	if err := emit(appConn); err != nil {
		t.Errorf("emit as %s (in emit_roles): %v", app, err)
	}
	if err := emit(otherConn); sqlState(err) != "42501" {
		t.Errorf("emit as %s (not in emit_roles): %v, want permission denied", other, err)
	}
	// USAGE on the schema, granted for emit, opens none of walhook's tables.
	for _, q := range []string{`INSERT INTO walhook.control (kind, body) VALUES ('replay', '{}')`,
		`INSERT INTO walhook.subscriptions (id, events, target_url, secret) VALUES ('x', '{*}', 'http://x', 's')`} {
		if _, err := appConn.Exec(ctx, q); sqlState(err) != "42501" {
			t.Errorf("%s as an emit role: %v, want permission denied", q, err)
		}
	}
	e.writeConfig("emit_roles: [" + other + "]\n")
	e.setup()
	if err := emit(appConn); sqlState(err) != "42501" {
		t.Errorf("emit as %s after it left emit_roles: %v, want permission denied", app, err)
	}
	if err := emit(otherConn); err != nil {
		t.Errorf("emit as %s after it joined emit_roles: %v", other, err)
	}

	e.writeConfig("accept_emit: false\nsubscriptions:\n" + sub("s", srv.HooksURL(), `["*"]`))
	r := e.start()
	if err := emit(otherConn); err != nil {
		t.Fatal(err)
	}
	if _, err := appConn.Exec(ctx, `SELECT pg_logical_emit_message(true, 'walhook', '{"event": "raw"}')`); err != nil {
		t.Fatal(err)
	}
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('row')`)
	srv.WaitN(t, 1, 30*time.Second)
	e.waitCaughtUp()
	for _, q := range srv.Requests() {
		if typ := decode(t, q.Body).Type; typ != "row" {
			t.Errorf("delivered %q with accept_emit: false", typ)
		}
	}
	_, body := get(t, e.addr(r)+"/metrics")
	// Two emits since start, and the two that succeeded above (the slot exists since setup).
	if got := metric(body, "walhook_forged_messages_total", `prefix="walhook"`); got != 4 {
		t.Errorf("walhook_forged_messages_total{prefix=\"walhook\"} = %v, want 4", got)
	}
}

// TestSetupUpgradesToTheControlTable: on an install made before walhook.control
// (the trigger emitted logical messages), run refuses and says to run setup;
// setup refuses while an older walhook streams the slot, and once it has
// stopped adds the table to the publication and replaces the trigger; API
// subscription changes work again.
func TestSetupUpgradesToTheControlTable(t *testing.T) {
	t.Parallel()
	srv := echoing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n")
	e.setup()
	// Back to what an older setup left.
	e.exec(`ALTER PUBLICATION ` + e.db.Name + ` DROP TABLE walhook.control`)
	e.exec(`DROP TABLE walhook.control`)
	e.exec(`CREATE OR REPLACE FUNCTION walhook.subscription_changed() RETURNS trigger LANGUAGE plpgsql SECURITY INVOKER AS $fn$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_logical_emit_message(true, 'walhook.subscription', jsonb_build_object('op', 'delete', 'id', OLD.id)::text);
    RETURN OLD;
  END IF;
  PERFORM pg_logical_emit_message(true, 'walhook.subscription', jsonb_build_object('op', 'upsert', 'row', to_jsonb(NEW))::text);
  RETURN NEW;
END $fn$`)
	if code, _, stderr := e.walhook("run"); code != exitFail || !strings.Contains(stderr, "walhook.control") || !strings.Contains(stderr, "walhook setup") {
		t.Fatalf("run on an old install: exit %d: %s", code, stderr)
	}
	// An older walhook streams the slot.
	ctx := context.Background()
	old, err := pgconn.Connect(ctx, e.db.URL+"&replication=database")
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close(ctx)
	err = pglogrepl.StartReplication(ctx, old, e.db.Name, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names '" + e.db.Name + "'", "messages 'true'"}})
	if err != nil {
		t.Fatal(err)
	}
	e.eventually(10*time.Second, "the older walhook to hold the slot", e.slotActive)
	if code, _, stderr := e.walhook("setup"); code != exitFail || !strings.Contains(stderr, "older than this version") {
		t.Fatalf("setup under a running older walhook: exit %d: %s", code, stderr)
	}
	old.Close(ctx)
	e.eventually(30*time.Second, "the slot to be released", func() bool { return !e.slotActive() })
	e.setup()
	var published, publicCanInsert bool
	e.db.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1
		AND schemaname = 'walhook' AND tablename = 'control')`, e.db.Name).Scan(&published)
	e.db.Pool.QueryRow(ctx, `SELECT has_table_privilege('public', 'walhook.control', 'INSERT')`).Scan(&publicCanInsert)
	if !published || publicCanInsert {
		t.Errorf("after the upgrade: walhook.control published %v, insertable by PUBLIC %v", published, publicCanInsert)
	}
	r := e.start()
	api := client{t: t, base: e.addr(r), token: adminToken}
	if status, _ := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": srv.HooksURL()}); status != 201 {
		t.Fatalf("create subscription: %d", status)
	}
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('after_upgrade')`)
	srv.Wait(t, 30*time.Second, "a delivery to the subscription created after the upgrade", func(q []sendertest.Request) bool {
		return len(hooksOnly(q)) == 1
	})
}

// TestTargetRefusedAtDialIsDeadLettered: a subscription's target that the
// SSRF guard refuses when walhook dials it (here: allow_targets no longer
// lets loopback through after a restart, as a name rebound to a forbidden
// address would) is dead-lettered at once with "target not allowed", not
// retried for retry_for, and the stream goes on.
func TestTargetRefusedAtDialIsDeadLettered(t *testing.T) {
	t.Parallel()
	srv := echoing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n")
	e.setup()
	r := e.start()
	api := client{t: t, base: e.addr(r), token: adminToken}
	status, got := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": srv.HooksURL(), "verify_intent": false})
	if status != 201 {
		t.Fatalf("create: %d %v", status, got)
	}
	e.waitCaughtUp()
	r.stop()
	e.writeConfig("admin_token: " + adminToken + "\n") // loopback is forbidden now
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('a', 'r1')`)
	var reason string
	e.eventually(30*time.Second, "the event to be dead-lettered", func() bool {
		return e.db.Pool.QueryRow(context.Background(), `SELECT reason FROM walhook.dead_letters`).Scan(&reason) == nil
	})
	if !strings.Contains(reason, "target not allowed") {
		t.Errorf("dead letter reason %q, want it to say target not allowed", reason)
	}
	e.waitCaughtUp()
	if n := len(hooksOnly(srv.Requests())); n != 0 {
		t.Errorf("the forbidden target got %d hooks", n)
	}
}
