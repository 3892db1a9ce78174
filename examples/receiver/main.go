// Command receiver is a minimal webhook endpoint for walhook: it verifies the
// Standard Webhooks signature, drops duplicates by webhook-id, and prints what
// it receives, one JSON line per event (a batch is an array of them).
//
//	go run ./examples/receiver -listen 127.0.0.1:9090 -secret whsec_...
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"sync"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9090", "address to listen on")
	secret := flag.String("secret", os.Getenv("WEBHOOK_SECRET"), "signing secret, whsec_... (env WEBHOOK_SECRET)")
	flag.Parse()
	wh, err := standardwebhooks.NewWebhook(*secret)
	if err != nil {
		log.Fatalf("receiver: bad secret: %v", err)
	}
	h := &handler{wh: wh, seen: map[string]bool{}, out: os.Stdout}
	log.Printf("receiver: listening on %s", *listen)
	log.Fatal(http.ListenAndServe(*listen, h))
}

type handler struct {
	wh   *standardwebhooks.Webhook
	mu   sync.Mutex
	seen map[string]bool // webhook-ids already handled (a real receiver keeps these in its database)
	out  io.Writer
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 10<<20))
	if err != nil {
		http.Error(w, "read body", http.StatusBadRequest)
		return
	}
	if err := h.wh.Verify(body, r.Header); err != nil {
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
	// A batching subscription (batch_max > 1) sends an array of envelopes.
	envelopes := []json.RawMessage{body}
	if len(body) > 0 && body[0] == '[' {
		if err := json.Unmarshal(body, &envelopes); err != nil {
			http.Error(w, "bad JSON", http.StatusBadRequest)
			return
		}
	}
	h.mu.Lock()
	for _, env := range envelopes {
		line, _ := json.Marshal(map[string]any{"webhook_id": id, "event": env})
		fmt.Fprintf(h.out, "%s\n", line)
	}
	h.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}
