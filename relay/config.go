package relay

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
)

// Defaults of Config.
const (
	DefaultStream     = "WALHOOK"
	DefaultPartitions = 64
	DefaultReplicas   = 3
	// DefaultDuplicates is the stream's duplicate window: a republish of the
	// same message id within it is dropped by JetStream.
	DefaultDuplicates = 10 * time.Minute
)

// Config says where the stream is and how it is cut.
type Config struct {
	URL             string        // NATS server URL(s), comma-separated; required
	Stream          string        // JetStream stream; default WALHOOK
	Partitions      int           // subjects <Stream>.p.0 … p.<Partitions-1>; default 64
	Replicas        int           // stream replicas: 1 or 3 (or 5); default 3
	Duplicates      time.Duration // duplicate window; default 10m
	CredentialsFile string        // NATS .creds file (JWT + nkey seed); optional
	NkeySeedFile    string        // nkey seed file; optional
	TLSCA           string        // CA file to verify the servers; optional
	TLSCert         string        // client certificate file (with TLSKey); optional
	TLSKey          string        // client key file; optional
	TLSServerName   string        // server name to verify; optional
}

// WithDefaults fills the unset fields.
func (c Config) WithDefaults() Config {
	if c.Stream == "" {
		c.Stream = DefaultStream
	}
	if c.Partitions == 0 {
		c.Partitions = DefaultPartitions
	}
	if c.Replicas == 0 {
		c.Replicas = DefaultReplicas
	}
	if c.Duplicates == 0 {
		c.Duplicates = DefaultDuplicates
	}
	return c
}

// subject is partition p's subject.
func (c Config) subject(p int) string { return c.Stream + ".p." + strconv.Itoa(p) }

// keepSubject holds the stream's keep message (Publisher.Run).
func (c Config) keepSubject() string { return c.Stream + ".keep" }

// consumer is partition p's durable consumer.
func (c Config) consumer(p int) string { return "p" + strconv.Itoa(p) }

// bucket is the key-value bucket of the partition leases and worker members.
func (c Config) bucket() string { return c.Stream + "_owners" }

// Partition is where a subscription's resource goes: every event of one
// (subscription, resource) in one partition, so one owner keeps their order.
func Partition(subscription, resource string, partitions int) int {
	h := fnv.New64a()
	h.Write([]byte(subscription))
	h.Write([]byte{0})
	h.Write([]byte(resource))
	return int(h.Sum64() % uint64(partitions))
}

// Connect opens a NATS connection with the credential and TLS options, which
// reconnects forever (publishers and workers keep their own state across).
func (c Config) Connect(name string, opts ...nats.Option) (*nats.Conn, error) {
	o := []nats.Option{nats.Name(name), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(true), nats.Timeout(5 * time.Second)}
	if c.CredentialsFile != "" {
		o = append(o, nats.UserCredentials(c.CredentialsFile))
	}
	if c.NkeySeedFile != "" {
		opt, err := nats.NkeyOptionFromSeed(c.NkeySeedFile)
		if err != nil {
			return nil, fmt.Errorf("relay.nkey_seed_file: %w", err)
		}
		o = append(o, opt)
	}
	if tc, err := c.tlsConfig(); err != nil {
		return nil, err
	} else if tc != nil {
		o = append(o, nats.Secure(tc))
	}
	nc, err := nats.Connect(c.URL, append(o, opts...)...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats: %w", err)
	}
	return nc, nil
}

func (c Config) tlsConfig() (*tls.Config, error) {
	if c.TLSCA == "" && c.TLSCert == "" && c.TLSServerName == "" {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.TLSServerName}
	if c.TLSCA != "" {
		pem, err := os.ReadFile(c.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("relay.tls_ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, errors.New("relay.tls_ca: no PEM certificate in the file")
		}
		tc.RootCAs = pool
	}
	if c.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("relay.tls_cert: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
