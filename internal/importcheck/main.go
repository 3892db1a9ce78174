// Command importcheck enforces the import rules of docs/development.md
// ("Layout and import rules") on the packages `go list ./...` names, their
// non-test imports only. `make vet` runs it.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

const module = "github.com/walhook/walhook"

// rule: a package (or, with a trailing "/...", a tree) must not import another.
type rule struct {
	from, to, why string
}

var rules = []rule{
	{"outbox", "github.com/jackc/pgx/...", "the core knows no database: outbox/pgstore does"},
	{"outbox", "net/http", "the core knows no HTTP: sender does"},
	{"cdc/...", "sender/...", "the stream and the sender meet only in outbox"},
	{"sender/...", "cdc/...", "the stream and the sender meet only in outbox"},
	{"api/...", "cdc/...", "the API changes subscriptions through the store, never the stream"},
	{"api/...", "outbox/pgstore", "the API knows its store by the interface api.Store, not by the database behind it"},
	{"relay/...", "cdc/...", "relay carries routed work: it knows neither the stream nor HTTP"},
	{"relay/...", "sender/...", "relay carries routed work: it knows neither the stream nor HTTP"},
	{"...", "cmd/...", "cmd is wiring: nothing builds on it"},
}

// matches reports whether path is pattern: a package, or pattern's tree when
// it ends in /...; a pattern without a dot is one of this module's.
func matches(pattern, path string) bool {
	if pattern == "..." {
		return strings.HasPrefix(path, module+"/")
	}
	if !strings.Contains(strings.SplitN(pattern, "/", 2)[0], ".") && pattern != "net/http" {
		pattern = module + "/" + pattern
	}
	if tree, ok := strings.CutSuffix(pattern, "/..."); ok {
		return path == tree || strings.HasPrefix(path, tree+"/")
	}
	return path == pattern
}

func main() {
	out, err := exec.Command("go", "list", "-json", "./...").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "importcheck: go list:", err)
		os.Exit(2)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	bad := 0
	for {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			fmt.Fprintln(os.Stderr, "importcheck:", err)
			os.Exit(2)
		}
		for _, r := range rules {
			if !matches(r.from, p.ImportPath) {
				continue
			}
			for _, imp := range p.Imports {
				if matches(r.to, imp) {
					fmt.Printf("%s imports %s: %s\n", p.ImportPath, imp, r.why)
					bad++
				}
			}
		}
	}
	if bad > 0 {
		os.Exit(1)
	}
}
