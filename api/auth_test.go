package api

import (
	"crypto/sha256"
	"fmt"
	"net/netip"
	"testing"
	"time"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }

func TestAuthCacheExpiresAndStaysBounded(t *testing.T) {
	clk := &clock{t: time.Unix(1e9, 0)}
	c := newAuthCache(10*time.Second, clk.now)
	key := sha256.Sum256([]byte("Bearer alice"))
	c.put(key, "a", true)
	if tenant, ok, hit := c.get(key); !hit || !ok || tenant != "a" {
		t.Fatalf("get = %q %v %v", tenant, ok, hit)
	}
	clk.advance(10 * time.Second)
	if _, _, hit := c.get(key); hit {
		t.Error("an answer was reused after its ttl")
	}
	for i := range authCacheSize + 100 {
		c.put(sha256.Sum256(fmt.Appendf(nil, "Bearer %d", i)), "", false)
	}
	if n := len(c.entries); n > authCacheSize {
		t.Errorf("%d entries, more than %d", n, authCacheSize)
	}
	off := newAuthCache(0, clk.now)
	off.put(key, "a", true)
	if _, _, hit := off.get(key); hit {
		t.Error("ttl 0 cached an answer")
	}
}

func TestLimiterRefills(t *testing.T) {
	clk := &clock{t: time.Unix(1e9, 0)}
	l := newLimiter(1, clk.now) // burst 4
	a, b := netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("192.0.2.2/32")
	for i := range 4 {
		if !l.allowed(a) {
			t.Fatalf("refused after %d failures, burst is 4", i)
		}
		l.take(a)
	}
	if l.allowed(a) {
		t.Error("allowed after the burst")
	}
	if !l.allowed(b) {
		t.Error("another address is limited too")
	}
	clk.advance(time.Second)
	if !l.allowed(a) {
		t.Error("no token back after a second at rate 1")
	}
	for i := range limiterSize + 10 {
		l.take(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32))
	}
	if n := len(l.buckets); n > limiterSize {
		t.Errorf("%d buckets, more than %d", n, limiterSize)
	}
}
