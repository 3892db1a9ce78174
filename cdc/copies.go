package cdc

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// SlotCopy is the slot as one host of database_url sees it: on the primary,
// the slot walhook streams; on a standby with sync_replication_slots
// (PostgreSQL 17+), the synchronised copy that a promotion would make usable.
type SlotCopy struct {
	Host           string `json:"host"`
	Role           string `json:"role"`   // primary or standby; "" when the host did not answer
	Exists         bool   `json:"exists"` // the host has the slot
	Failover       *bool  `json:"failover"`
	Synced         *bool  `json:"synced"`              // synchronised from a primary; nil before 17
	Temporary      bool   `json:"temporary"`           // a standby's copy stays temporary until it caught up with the primary's
	ConfirmedFlush string `json:"confirmed_flush_lsn"` // on a standby: how far a promotion would resume
	Invalidation   string `json:"invalidation_reason,omitempty"`
	Error          string `json:"error,omitempty"` // why the host could not be asked
}

// SlotCopies asks every host listed in databaseURL (host=a,b or
// postgres://a,b/...) about the slot, each with its own connection and
// timeout, whatever target_session_attrs says: walhook status shows whether a
// standby holds a synchronised copy that a failover would continue from.
func SlotCopies(ctx context.Context, databaseURL, slot string, timeout time.Duration) ([]SlotCopy, error) {
	base, err := pgx.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("parse database_url: %w", err)
	}
	// One connection per host: the fallbacks of one host (sslmode=prefer
	// tries TLS, then plain) stay its fallbacks.
	var names []string
	configs := map[string]*pgx.ConnConfig{}
	add := func(host string, port uint16, fb *pgconn.FallbackConfig) {
		name := net.JoinHostPort(host, strconv.Itoa(int(port)))
		if c, ok := configs[name]; ok {
			c.Fallbacks = append(c.Fallbacks, fb)
			return
		}
		c := base.Copy()
		c.Host, c.Port, c.TLSConfig = host, port, fb.TLSConfig
		c.Fallbacks, c.ValidateConnect = nil, nil
		configs[name] = c
		names = append(names, name)
	}
	add(base.Host, base.Port, &pgconn.FallbackConfig{Host: base.Host, Port: base.Port, TLSConfig: base.TLSConfig})
	for _, fb := range base.Fallbacks {
		add(fb.Host, fb.Port, fb)
	}
	out := make([]SlotCopy, 0, len(names))
	for _, name := range names {
		out = append(out, slotCopy(ctx, configs[name], name, slot, timeout))
	}
	return out, nil
}

func slotCopy(ctx context.Context, cfg *pgx.ConnConfig, name, slot string, timeout time.Duration) SlotCopy {
	sc := SlotCopy{Host: name}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cfg.ConnectTimeout = timeout
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		sc.Error = "connect: " + err.Error()
		return sc
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var standby bool
	var row []byte
	err = conn.QueryRow(ctx, `SELECT pg_is_in_recovery(), (SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = $1)`,
		slot).Scan(&standby, &row)
	if err != nil {
		sc.Error = "read pg_replication_slots: " + err.Error()
		return sc
	}
	sc.Role = "primary"
	if standby {
		sc.Role = "standby"
	}
	if row == nil {
		return sc
	}
	var v struct {
		Failover     *bool   `json:"failover"`
		Synced       *bool   `json:"synced"`
		Temporary    bool    `json:"temporary"`
		Confirmed    *string `json:"confirmed_flush_lsn"`
		Invalidation *string `json:"invalidation_reason"`
	}
	if err := json.Unmarshal(row, &v); err != nil {
		sc.Error = "read pg_replication_slots: " + err.Error()
		return sc
	}
	sc.Exists, sc.Failover, sc.Synced, sc.Temporary = true, v.Failover, v.Synced, v.Temporary
	if v.Confirmed != nil {
		sc.ConfirmedFlush = *v.Confirmed
	}
	if v.Invalidation != nil {
		sc.Invalidation = *v.Invalidation
	}
	return sc
}
