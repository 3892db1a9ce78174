// Command relay is the "SQL-based queue" baseline the REST Hooks performance
// guide calls the cheap hack: poll the outbox table, deliver, delete. It exists
// only to be measured against walhook by `make bench`.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

func main() {
	db := flag.String("db", "", "database URL")
	target := flag.String("target", "", "where to POST: a URL, or several comma-separated (each row to each, in turn)")
	interval := flag.Duration("interval", 100*time.Millisecond, "poll interval when the outbox is empty")
	batch := flag.Int("batch", 100, "rows per poll")
	flag.Parse()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, *db)
	if err != nil {
		log.Fatal(err)
	}
	client := &http.Client{Timeout: 10 * time.Second}
	for {
		n, err := pollOnce(ctx, pool, client, strings.Split(*target, ","), *batch)
		if err != nil {
			log.Print(err)
		}
		if n == 0 {
			time.Sleep(*interval) // the relay's poll interval: what it is made of
		}
	}
}

type row struct {
	ID         int64           `json:"id"`
	Type       string          `json:"type"`
	ResourceID *string         `json:"resource_id"`
	Tenant     *string         `json:"tenant"`
	Timestamp  time.Time       `json:"timestamp"`
	Data       json.RawMessage `json:"data"`
}

// pollOnce locks a batch, delivers it row by row (each row to every target in
// turn), deletes it.
func pollOnce(ctx context.Context, pool *pgxpool.Pool, client *http.Client, targets []string, batch int) (int, error) {
	n := 0
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT id, event, resource_id, tenant, created_at, payload FROM walhook.outbox
			ORDER BY id FOR UPDATE SKIP LOCKED LIMIT $1`, batch)
		if err != nil {
			return err
		}
		got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
			var x row
			err := r.Scan(&x.ID, &x.Type, &x.ResourceID, &x.Tenant, &x.Timestamp, &x.Data)
			return x, err
		})
		if err != nil {
			return err
		}
		ids := make([]int64, 0, len(got))
		for _, x := range got {
			body, _ := json.Marshal(x)
			for _, target := range targets {
				resp, err := client.Post(target, "application/json", bytes.NewReader(body))
				if err != nil {
					return err
				}
				resp.Body.Close()
			}
			ids = append(ids, x.ID)
		}
		n = len(ids)
		if n == 0 {
			return nil
		}
		_, err = tx.Exec(ctx, `DELETE FROM walhook.outbox WHERE id = ANY($1)`, ids)
		return err
	})
	return n, err
}
