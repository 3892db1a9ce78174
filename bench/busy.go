package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/internal/procstat"
)

// busyPrimary measures what a streaming consumer costs a database whose
// transactions are not outbox rows, as on a primary where walhook runs next to
// an application: pgbench's simple-update at 1,000 transactions/s for 10 s,
// with nothing streaming the slot, with pg_recvlogical, and with walhook.
// Database CPU is every postgres process but autovacuum, pgbench's backends
// included.
func busyPrimary(consumer string) (map[string]float64, error) {
	dbName := "bench_busy_" + consumer
	db, cfg, err := prepare(dbName, "    batch_max: 1\n")
	if err != nil {
		return nil, err
	}
	pgbench := filepath.Join(os.Getenv("PG_BINDIR"), "pgbench")
	if out, err := exec.Command(pgbench, "-i", "-q", "-s", "1", db).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("pgbench -i: %v\n%s", err, out)
	}
	ctx := context.Background()
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return nil, err
	}
	defer c.Close(ctx)
	var cmd *exec.Cmd
	switch consumer {
	case "pg_recvlogical":
		cmd = recvlogical(db, dbName, "-s", "1")
	case "walhook":
		cmd = exec.Command(filepath.Join(bin, "walhook"), "run", "--config", cfg)
	}
	walsender := 0
	if cmd != nil {
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		defer stop(cmd)
		for deadline := time.Now().Add(time.Minute); walsender == 0 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) { // poll interval
			c.QueryRow(ctx, `SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = $1`, dbName).Scan(&walsender)
		}
		if walsender == 0 {
			return nil, fmt.Errorf("%s did not start streaming", consumer)
		}
	}
	const tps, seconds = 1000, 10
	cpu0, ws0 := postgresCPU(), procstat.CPUSeconds(walsender)
	var own0 float64
	if cmd != nil {
		own0 = procstat.CPUSeconds(cmd.Process.Pid)
	}
	out, err := exec.Command(pgbench, "-n", "-b", "simple-update", "-c", "4", "-j", "2",
		"-R", fmt.Sprint(tps), "-T", fmt.Sprint(seconds), db).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("pgbench: %v\n%s", err, out)
	}
	n := float64(tps * seconds)
	r := map[string]float64{"db_cpu_per_100k": (postgresCPU() - cpu0) / n * 100000}
	if cmd != nil {
		r["walsender_cpu_per_100k"] = (procstat.CPUSeconds(walsender) - ws0) / n * 100000
		r["consumer_cpu_per_100k"] = (procstat.CPUSeconds(cmd.Process.Pid) - own0) / n * 100000
	}
	return r, nil
}
