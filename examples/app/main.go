// Command app is a small contacts API that shows how an application feeds
// walhook: every write puts the business row and its outbox row in ONE
// transaction. If the transaction rolls back, there is no hook; if it commits,
// walhook delivers it, even if this process dies right after.
//
//	go run ./examples/app -db postgres://... -listen 127.0.0.1:8081
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

func main() {
	db := flag.String("db", os.Getenv("DATABASE_URL"), "database URL (env DATABASE_URL)")
	listen := flag.String("listen", "127.0.0.1:8081", "address to listen on")
	flag.Parse()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, *db)
	if err != nil {
		log.Fatalf("app: %v", err)
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS contacts (
		id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		tenant text NOT NULL, name text NOT NULL, email text NOT NULL)`); err != nil {
		log.Fatalf("app: create table: %v", err)
	}
	a := &app{pool: pool}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /contacts", a.create)
	mux.HandleFunc("GET /contacts/{id}", a.get)
	mux.HandleFunc("PATCH /contacts/{id}", a.update)
	mux.HandleFunc("DELETE /contacts/{id}", a.delete)
	log.Printf("app: listening on %s", *listen)
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}

type app struct{ pool *pgxpool.Pool }

type contact struct {
	ID     int64  `json:"id"`
	Tenant string `json:"tenant"`
	Name   string `json:"name"`
	Email  string `json:"email"`
}

// emit writes the outbox row, inside the caller's transaction. The idioms:
//   - event: "<resource>.<past-tense verb>", so subscribers can ask for "contact.*";
//   - resource_id: the business row's id, so walhook orders (and debounces) per contact;
//   - tenant: who owns the row, so a tenant's subscriptions get only its events;
//   - payload: the state after the change (what a receiver needs to act without
//     calling back), never secrets; keep it small, or use skinny subscriptions.
func emit(ctx context.Context, tx pgx.Tx, event string, c contact) error {
	_, err := tx.Exec(ctx, `INSERT INTO walhook.outbox (event, resource_id, tenant, payload) VALUES ($1, $2, $3, $4)`,
		event, strconv.FormatInt(c.ID, 10), c.Tenant, c)
	return err
}

func (a *app) create(w http.ResponseWriter, r *http.Request) {
	var c contact
	if err := json.NewDecoder(r.Body).Decode(&c); err != nil || c.Tenant == "" {
		http.Error(w, `{"error":"want {tenant, name, email}"}`, http.StatusBadRequest)
		return
	}
	err := pgx.BeginFunc(r.Context(), a.pool, func(tx pgx.Tx) error {
		err := tx.QueryRow(r.Context(), `INSERT INTO contacts (tenant, name, email) VALUES ($1, $2, $3) RETURNING id`,
			c.Tenant, c.Name, c.Email).Scan(&c.ID)
		if err != nil {
			return err
		}
		if err := emit(r.Context(), tx, "contact.created", c); err != nil {
			return err
		}
		// A check that fails after both writes: the transaction rolls back, the
		// outbox row with it, and no hook is ever sent.
		if c.Email == "" {
			return errInvalid
		}
		return nil
	})
	reply(w, http.StatusCreated, c, err)
}

var errInvalid = errors.New("email is required")

func (a *app) get(w http.ResponseWriter, r *http.Request) {
	var c contact
	err := a.pool.QueryRow(r.Context(), `SELECT id, tenant, name, email FROM contacts WHERE id = $1`, r.PathValue("id")).
		Scan(&c.ID, &c.Tenant, &c.Name, &c.Email)
	reply(w, http.StatusOK, c, err)
}

func (a *app) update(w http.ResponseWriter, r *http.Request) {
	var patch struct{ Name, Email *string }
	if err := json.NewDecoder(r.Body).Decode(&patch); err != nil {
		http.Error(w, `{"error":"bad JSON"}`, http.StatusBadRequest)
		return
	}
	var c contact
	err := pgx.BeginFunc(r.Context(), a.pool, func(tx pgx.Tx) error {
		err := tx.QueryRow(r.Context(), `UPDATE contacts SET name = coalesce($2, name), email = coalesce($3, email)
			WHERE id = $1 RETURNING id, tenant, name, email`, r.PathValue("id"), patch.Name, patch.Email).
			Scan(&c.ID, &c.Tenant, &c.Name, &c.Email)
		if err != nil {
			return err
		}
		return emit(r.Context(), tx, "contact.updated", c)
	})
	reply(w, http.StatusOK, c, err)
}

func (a *app) delete(w http.ResponseWriter, r *http.Request) {
	var c contact
	err := pgx.BeginFunc(r.Context(), a.pool, func(tx pgx.Tx) error {
		err := tx.QueryRow(r.Context(), `DELETE FROM contacts WHERE id = $1 RETURNING id, tenant, name, email`,
			r.PathValue("id")).Scan(&c.ID, &c.Tenant, &c.Name, &c.Email)
		if err != nil {
			return err
		}
		return emit(r.Context(), tx, "contact.deleted", c)
	})
	reply(w, http.StatusOK, c, err)
}

func reply(w http.ResponseWriter, status int, body any, err error) {
	w.Header().Set("content-type", "application/json")
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"error":"no such contact"}`))
		return
	case errors.Is(err, errInvalid):
		w.WriteHeader(http.StatusUnprocessableEntity)
		json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	case err != nil:
		log.Printf("app: %v", err)
		w.WriteHeader(http.StatusInternalServerError)
		w.Write([]byte(`{"error":"internal error"}`))
		return
	}
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(body)
}
