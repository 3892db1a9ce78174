package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// EnvURL names the environment variable through which a running cluster is shared
// with every test package of one `go test` run (set by pgtmp, read by New).
const EnvURL = "WALHOOK_TEST_DATABASE_URL"

// Cluster is a throwaway PostgreSQL server: its own data directory, port and
// socket directory, wal_level=logical. Stop removes everything it made.
type Cluster struct {
	URL      string // superuser URL of the "postgres" database, over TCP on 127.0.0.1
	BinDir   string
	dir      string
	port     int
	asUser   string // OS user the server runs as when we are root, else ""
	stopped  bool
	settings []string
}

// Start creates and starts a cluster; settings are extra "name=value" server
// settings (the defaults favour speed: fsync and synchronous_commit off).
func Start(ctx context.Context, settings ...string) (*Cluster, error) {
	bin, err := findBinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "walhook-pg-")
	if err != nil {
		return nil, fmt.Errorf("pgtest: temp dir: %w", err)
	}
	c := &Cluster{BinDir: bin, dir: dir, settings: settings}
	if err := c.own(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := c.initdb(ctx); err != nil {
		c.Stop()
		return nil, err
	}
	if err := c.start(ctx); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// own hands c's directory to the postgres OS user when we are root:
// PostgreSQL refuses to run as root.
func (c *Cluster) own() error {
	if os.Geteuid() != 0 {
		return nil
	}
	c.asUser = "postgres"
	if _, err := user.Lookup(c.asUser); err != nil {
		return fmt.Errorf("pgtest: running as root and there is no %q OS user to run PostgreSQL as (install the postgresql package): %w", c.asUser, err)
	}
	if out, err := exec.Command("chown", c.asUser, c.dir).CombinedOutput(); err != nil {
		return fmt.Errorf("pgtest: chown %s: %v: %s", c.dir, err, out)
	}
	os.Chmod(c.dir, 0o755)
	return nil
}

func (c *Cluster) data() string    { return filepath.Join(c.dir, "data") }
func (c *Cluster) sockets() string { return c.dir }
func (c *Cluster) logFile() string { return filepath.Join(c.dir, "server.log") }

func (c *Cluster) initdb(ctx context.Context) error {
	initdb := []string{filepath.Join(c.BinDir, "initdb"), "-D", c.data(), "-U", "postgres",
		"--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"}
	if out, err := c.command(ctx, initdb...).CombinedOutput(); err != nil {
		return fmt.Errorf("pgtest: initdb: %v: %s", err, out)
	}
	return nil
}

// start starts the server on a free port (the one it had, when it had one).
func (c *Cluster) start(ctx context.Context) error {
	var lastErr error
	for range 5 { // a free port can be taken between probing and binding
		port := c.port
		if port == 0 || lastErr != nil {
			var err error
			if port, err = freePort(); err != nil {
				return err
			}
		}
		c.port = port
		args := []string{
			"-p", strconv.Itoa(port),
			"-k", c.sockets(),
			"-c", "listen_addresses=127.0.0.1",
			"-c", "wal_level=logical",
			"-c", "max_replication_slots=100",
			"-c", "max_wal_senders=100",
			"-c", "max_connections=300",
			"-c", "fsync=off",
			"-c", "synchronous_commit=off",
			"-c", "full_page_writes=off",
			"-c", "shared_buffers=64MB",
			"-c", "wal_sender_timeout=60s",
		}
		for _, st := range c.settings {
			args = append(args, "-c", st)
		}
		opts := strings.Join(args, " ")
		cmd := c.command(ctx, filepath.Join(c.BinDir, "pg_ctl"), "-D", c.data(), "-l", c.logFile(),
			"-o", opts, "-w", "-t", "60", "start")
		out, err := cmd.CombinedOutput()
		if err == nil {
			c.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
			return nil
		}
		log, _ := os.ReadFile(c.logFile())
		lastErr = fmt.Errorf("pgtest: pg_ctl start: %v: %s\n%s", err, out, log)
		if !strings.Contains(string(log), "could not bind") && !strings.Contains(string(log), "in use") {
			return lastErr
		}
	}
	return lastErr
}

// Stop shuts the server down immediately and removes its directory. Safe to call twice.
func (c *Cluster) Stop() error {
	if c == nil || c.stopped {
		return nil
	}
	c.stopped = true
	var err error
	if c.URL != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, e := c.command(ctx, filepath.Join(c.BinDir, "pg_ctl"), "-D", c.data(), "-m", "immediate", "-w", "stop").CombinedOutput()
		if e != nil {
			err = fmt.Errorf("pgtest: pg_ctl stop: %v: %s", e, out)
		}
	}
	os.RemoveAll(c.dir)
	return err
}

// Restart restarts the server with the given stop mode ("fast" or "immediate").
func (c *Cluster) Restart(ctx context.Context, mode string) error {
	out, err := c.command(ctx, filepath.Join(c.BinDir, "pg_ctl"), "-D", c.data(), "-m", mode, "-w", "-l", c.logFile(), "restart").CombinedOutput()
	if err != nil {
		return fmt.Errorf("pgtest: pg_ctl restart: %v: %s", err, out)
	}
	return nil
}

func (c *Cluster) command(ctx context.Context, args ...string) *exec.Cmd {
	if c.asUser != "" {
		args = append([]string{"runuser", "-u", c.asUser, "--"}, args...)
	}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Dir = c.dir
	return cmd
}

// BinDir returns the directory of the PostgreSQL binaries the harness uses.
func BinDir() (string, error) { return findBinDir() }

// Psql returns a psql: the one beside the server binaries, or else Debian's or
// the one on PATH (the server packages from npm ship none; psql speaks to
// servers of other versions).
func Psql() (string, error) {
	if bin, err := findBinDir(); err == nil {
		if p := filepath.Join(bin, "psql"); isFile(p) {
			return p, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if p := filepath.Join(d, "psql"); isFile(p) {
			return p, nil
		}
	}
	if p, err := exec.LookPath("psql"); err == nil {
		return p, nil
	}
	return "", errors.New("pgtest: psql not found (looked beside the server binaries, at /usr/lib/postgresql/*/bin and on PATH)")
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// findBinDir locates the PostgreSQL server binaries: $PG_BINDIR, then the newest
// /usr/lib/postgresql/*/bin, then initdb on PATH.
func findBinDir() (string, error) {
	if d := os.Getenv("PG_BINDIR"); d != "" {
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", errors.New("pgtest: PostgreSQL server binaries not found (looked at $PG_BINDIR, /usr/lib/postgresql/*/bin and PATH); install them with `apt-get install -y postgresql`")
}

func versionOf(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgtest: find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
