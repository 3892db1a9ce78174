package main

import (
	"context"
	"fmt"
	"net/url"
	"sort"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// decodingFloor measures PostgreSQL's own commit → decoded latency under the
// latency scenario's load: a bare consumer on a temporary pgoutput slot that
// timestamps each insert as it arrives, and does nothing else. It is the
// reference for walhook's commit → receipt.
func decodingFloor(eps int, d time.Duration) (map[string]any, error) {
	db, _, err := prepare(fmt.Sprintf("bench_floor_%d", eps), "")
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	u, _ := url.Parse(db)
	q := u.Query()
	q.Set("replication", "database")
	u.RawQuery = q.Encode()
	conn, err := pgconn.Connect(ctx, u.String())
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	if _, err := pglogrepl.CreateReplicationSlot(ctx, conn, "floor", "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true}); err != nil {
		return nil, err
	}
	if err := pglogrepl.StartReplication(ctx, conn, "floor", 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'walhook'"}}); err != nil {
		return nil, err
	}
	done := make(chan struct{})
	defer close(done)
	produced := make(chan int, 1)
	go func() { produced <- produce(db, eps, d, done) }()

	var lat []float64
	var commit time.Time
	var pos pglogrepl.LSN
	total, nextStatus := -1, time.Now()
	deadline := time.Now().Add(d + time.Minute)
	for total < 0 || len(lat) < total {
		select {
		case total = <-produced:
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("decoding floor: %d of %d inserts decoded", len(lat), total)
		}
		if time.Now().After(nextStatus) {
			pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: pos})
			nextStatus = time.Now().Add(time.Second)
		}
		rctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		msg, err := conn.ReceiveMessage(rctx)
		cancel()
		if pgconn.Timeout(err) {
			continue
		}
		if err != nil {
			return nil, err
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 || cd.Data[0] != pglogrepl.XLogDataByteID {
			continue
		}
		x, err := pglogrepl.ParseXLogData(cd.Data[1:])
		if err != nil {
			return nil, err
		}
		pos = x.WALStart + pglogrepl.LSN(len(x.WALData))
		switch m, _ := pglogrepl.Parse(x.WALData); m := m.(type) {
		case *pglogrepl.BeginMessage:
			commit = m.CommitTime
		case *pglogrepl.InsertMessage:
			lat = append(lat, float64(time.Since(commit).Microseconds())/1000)
		}
	}
	sort.Float64s(lat)
	quantile := func(p float64) float64 { return lat[min(int(p*float64(len(lat))), len(lat)-1)] }
	return map[string]any{"p50_ms": quantile(0.5), "p99_ms": quantile(0.99), "max_ms": lat[len(lat)-1]}, nil
}
