// Command receiver is a minimal webhook endpoint for walhook. It shows what a
// receiver should do:
//
//   - answer the REST Hooks X-Hook-Secret handshake by echoing the header;
//   - verify the Standard Webhooks signature (several secrets during a rotation);
//   - drop duplicates by webhook-id (walhook delivers at least once);
//   - accept a batch (a JSON array of envelopes) as well as a single envelope;
//   - fetch resource_url for a skinny envelope (no data);
//   - answer 410 Gone to unsubscribe (here: after POST /control/unsubscribe).
//
// It prints one JSON line per event.
//
//	go run ./examples/receiver -listen 127.0.0.1:9090 -secret whsec_...
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9090", "address to listen on")
	secrets := flag.String("secret", os.Getenv("WEBHOOK_SECRET"), "signing secrets, comma-separated during a rotation (env WEBHOOK_SECRET)")
	flag.Parse()
	h, err := newHandler(strings.Split(*secrets, ","), os.Stdout)
	if err != nil {
		log.Fatalf("receiver: %v", err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /hooks", h)
	mux.HandleFunc("POST /control/unsubscribe", h.unsubscribe)
	log.Printf("receiver: listening on %s", *listen)
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}

type handler struct {
	verifiers []*standardwebhooks.Webhook
	fetch     *http.Client
	mu        sync.Mutex
	seen      map[string]bool // webhook-ids handled (a real receiver keeps them in its database, with a TTL)
	gone      bool
	out       io.Writer
}

func newHandler(secrets []string, out io.Writer) (*handler, error) {
	h := &handler{seen: map[string]bool{}, out: out, fetch: &http.Client{Timeout: 5 * time.Second}}
	for _, s := range secrets {
		wh, err := standardwebhooks.NewWebhook(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("bad secret: %v", err)
		}
		h.verifiers = append(h.verifiers, wh)
	}
	return h, nil
}

func (h *handler) unsubscribe(w http.ResponseWriter, _ *http.Request) {
	h.mu.Lock()
	h.gone = true
	h.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// The handshake: prove to walhook that this endpoint wants the hooks.
	if s := r.Header.Get("X-Hook-Secret"); s != "" {
		w.Header().Set("X-Hook-Secret", s)
		w.WriteHeader(http.StatusOK)
		return
	}
	h.mu.Lock()
	gone := h.gone
	h.mu.Unlock()
	if gone {
		w.WriteHeader(http.StatusGone) // walhook deletes the subscription
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 10<<20))
	if err != nil {
		http.Error(w, "read body", http.StatusBadRequest)
		return
	}
	if err := h.verify(body, r.Header); err != nil {
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	id := r.Header.Get("webhook-id")
	h.mu.Lock()
	dup := h.seen[id]
	h.seen[id] = true
	h.mu.Unlock()
	if dup {
		w.WriteHeader(http.StatusOK) // already handled: acknowledge, do nothing
		return
	}
	envelopes := []json.RawMessage{body}
	if len(body) > 0 && body[0] == '[' {
		if err := json.Unmarshal(body, &envelopes); err != nil {
			http.Error(w, "bad JSON", http.StatusBadRequest)
			return
		}
	}
	for _, env := range envelopes {
		if err := h.handle(r.Context(), id, env); err != nil {
			h.mu.Lock()
			delete(h.seen, id) // let the retry try again
			h.mu.Unlock()
			http.Error(w, err.Error(), http.StatusServiceUnavailable) // walhook retries
			return
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) verify(body []byte, header http.Header) error {
	err := errors.New("no secret")
	for _, v := range h.verifiers {
		if err = v.Verify(body, header); err == nil {
			return nil
		}
	}
	return err
}

// handle prints one event; a skinny one is completed by fetching its resource.
func (h *handler) handle(ctx context.Context, id string, env json.RawMessage) error {
	var e struct {
		Data        json.RawMessage `json:"data"`
		ResourceURL *string         `json:"resource_url"`
	}
	json.Unmarshal(env, &e)
	line := map[string]any{"webhook_id": id, "event": env}
	if e.Data == nil && e.ResourceURL != nil {
		fetched, err := h.get(ctx, *e.ResourceURL)
		if err != nil {
			return fmt.Errorf("fetch resource: %v", err)
		}
		line["fetched"] = fetched
	}
	out, _ := json.Marshal(line)
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := fmt.Fprintf(h.out, "%s\n", out)
	return err
}

func (h *handler) get(ctx context.Context, url string) (json.RawMessage, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := h.fetch.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusNotFound {
		return json.RawMessage("null"), nil // gone since: the event still happened
	}
	if resp.StatusCode != http.StatusOK || !json.Valid(body) {
		return nil, fmt.Errorf("GET %s: %d", url, resp.StatusCode)
	}
	return body, nil
}
