// Package ssrf keeps subscribers from reaching addresses they should not:
// loopback, private, link-local (cloud metadata), unique-local, multicast and
// unspecified addresses, whatever the spelling. It checks a URL when a
// subscription is made, and the dialed IP at every connect, so DNS rebinding
// cannot get around it.
package ssrf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"syscall"
)

// ErrForbidden is wrapped by every refusal.
var ErrForbidden = errors.New("target not allowed") // unprefixed: API users read it in target_url errors

// Error is a refusal: "target not allowed: " and why. It wraps ErrForbidden.
type Error struct {
	Detail string // why, e.g. "127.0.0.1 is a loopback address"
}

func (e *Error) Error() string { return ErrForbidden.Error() + ": " + e.Detail }
func (e *Error) Unwrap() error { return ErrForbidden }

func refuse(format string, args ...any) error { return &Error{Detail: fmt.Sprintf(format, args...)} }

// Guard decides which targets are allowed. The zero Guard allows only public
// addresses.
type Guard struct {
	nets  []netip.Prefix
	hosts map[string]bool
}

// New returns a Guard that also allows the given CIDRs, addresses or host names
// (config allow_targets). Its error names every bad entry, not only the first.
func New(allow []string) (*Guard, error) {
	g := &Guard{hosts: map[string]bool{}}
	var errs []error
	for _, a := range allow {
		a = strings.TrimSpace(a)
		if p, err := netip.ParsePrefix(a); err == nil {
			g.nets = append(g.nets, p.Masked())
			continue
		}
		if ip, err := netip.ParseAddr(a); err == nil {
			g.nets = append(g.nets, netip.PrefixFrom(ip, ip.BitLen()))
			continue
		}
		if a == "" || strings.ContainsAny(a, "/: ") {
			errs = append(errs, fmt.Errorf("%q is neither a CIDR, an address nor a host name", a))
			continue
		}
		g.hosts[strings.ToLower(strings.TrimSuffix(a, "."))] = true
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return g, nil
}

var blocked = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),       // "this network"
	netip.MustParsePrefix("100.64.0.0/10"),   // carrier-grade NAT
	netip.MustParsePrefix("192.0.0.0/24"),    // IETF protocol assignments
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking
	netip.MustParsePrefix("240.0.0.0/4"),     // reserved, broadcast
	netip.MustParsePrefix("fec0::/10"),       // site-local (deprecated)
	netip.MustParsePrefix("100::/64"),        // discard
	netip.MustParsePrefix("64:ff9b:1::/48"),  // local-use NAT64
	netip.MustParsePrefix("2001:db8::/32"),   // documentation
	netip.MustParsePrefix("::/128"),          // unspecified
	netip.MustParsePrefix("::1/128"),         // loopback
	netip.MustParsePrefix("fc00::/7"),        // unique-local
	netip.MustParsePrefix("fe80::/10"),       // link-local
	netip.MustParsePrefix("169.254.0.0/16"),  // link-local, cloud metadata
	netip.MustParsePrefix("127.0.0.0/8"),     // loopback
	netip.MustParsePrefix("10.0.0.0/8"),      // private
	netip.MustParsePrefix("172.16.0.0/12"),   // private
	netip.MustParsePrefix("192.168.0.0/16"),  // private
	netip.MustParsePrefix("224.0.0.0/4"),     // multicast
	netip.MustParsePrefix("ff00::/8"),        // multicast
	netip.MustParsePrefix("192.0.2.0/24"),    // documentation
	netip.MustParsePrefix("198.51.100.0/24"), // documentation
	netip.MustParsePrefix("203.0.113.0/24"),  // documentation
}

// CheckIP refuses a forbidden address, unless allow_targets opens it.
func (g *Guard) CheckIP(ip netip.Addr) error {
	ip = ip.Unmap().WithZone("")
	for _, p := range g.nets {
		if p.Contains(ip) {
			return nil
		}
	}
	// Addresses that embed an IPv4 address are judged by it.
	if ip.Is6() {
		b := ip.As16()
		switch {
		case netip.MustParsePrefix("64:ff9b::/96").Contains(ip): // NAT64
			return g.CheckIP(netip.AddrFrom4([4]byte(b[12:16])))
		case netip.MustParsePrefix("2002::/16").Contains(ip): // 6to4
			return g.CheckIP(netip.AddrFrom4([4]byte(b[2:6])))
		case netip.MustParsePrefix("::/96").Contains(ip) && ip != netip.IPv6Unspecified() && ip != netip.IPv6Loopback(): // IPv4-compatible
			return g.CheckIP(netip.AddrFrom4([4]byte(b[12:16])))
		}
	}
	for _, p := range blocked {
		if p.Contains(ip) {
			return refuse("%s is a %s address", ip, kind(ip))
		}
	}
	return nil
}

func kind(ip netip.Addr) string {
	switch {
	case ip.IsLoopback():
		return "loopback"
	case ip.IsPrivate():
		return "private"
	case ip.IsLinkLocalUnicast():
		return "link-local"
	case ip.IsMulticast():
		return "multicast"
	case ip.IsUnspecified():
		return "unspecified"
	}
	return "reserved"
}

// CheckURL checks a target when a subscription is made: http(s) only, and
// every address its host names (or resolves to) allowed.
func (g *Guard) CheckURL(ctx context.Context, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("not an absolute URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return refuse("scheme %q (http or https only)", u.Scheme)
	}
	if u.User != nil {
		return refuse("credentials in the URL")
	}
	host := strings.ToLower(strings.TrimSuffix(u.Hostname(), "."))
	if g.hosts[host] {
		return nil
	}
	if ip, ok := parseIP(host); ok {
		return g.CheckIP(ip)
	}
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return refuse("%s is a loopback name", host)
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return fmt.Errorf("cannot resolve %s: %v", host, err)
	}
	for _, a := range addrs {
		if err := g.CheckIP(a); err != nil {
			return err
		}
	}
	return nil
}

// parseIP reads an IP literal in any spelling a resolver might accept: IPv6,
// dotted IPv4, and the inet_aton forms (127.1, 2130706433, 0x7f000001,
// 0177.0.0.1).
func parseIP(host string) (netip.Addr, bool) {
	if ip, err := netip.ParseAddr(host); err == nil {
		return ip, true
	}
	parts := strings.Split(host, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	var nums []uint64
	for _, p := range parts {
		n, err := strconv.ParseUint(p, 0, 32) // 0x.. hex, 0.. octal, else decimal
		if err != nil || p == "" {
			return netip.Addr{}, false
		}
		nums = append(nums, n)
	}
	var v uint64
	last := len(nums) - 1
	for i, n := range nums[:last] {
		if n > 255 {
			return netip.Addr{}, false
		}
		v |= n << (8 * (3 - i))
	}
	if nums[last] >= 1<<(8*(4-last)) {
		return netip.Addr{}, false
	}
	v |= nums[last]
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

// Pin chooses the address a request to host goes to when it goes through a
// proxy, where the dial-time check sees only the proxy: host resolved now, and
// the first of its addresses the guard allows, or a refusal when none is.
// Sending to that address (with host in the Host header or TLS server name)
// rather than to the name keeps the proxy from resolving it again, to
// somewhere else. Like the dial-time check, and unlike CheckURL, it judges
// only addresses (localhost is fine if 127.0.0.1 is allowed). A host named in
// allow_targets is returned as it is.
func (g *Guard) Pin(ctx context.Context, host string) (string, error) {
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	if g.hosts[name] {
		return host, nil
	}
	if ip, ok := parseIP(name); ok {
		if err := g.CheckIP(ip); err != nil {
			return "", err
		}
		return ip.String(), nil // one spelling: a proxy might read 0x7f.1 otherwise
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", name)
	if err != nil {
		return "", fmt.Errorf("resolve %s: %w", name, err)
	}
	var refusal error
	for _, a := range addrs {
		err := g.CheckIP(a)
		if err == nil {
			return a.Unmap().String(), nil
		}
		if refusal == nil {
			refusal = err
		}
	}
	if refusal == nil {
		refusal = fmt.Errorf("resolve %s: no addresses", name)
	}
	return "", refusal
}

// DialContext returns a dial function that checks the IP actually dialed.
func (g *Guard) DialContext(d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	guarded := *d
	guarded.Control = func(_, address string, _ syscall.RawConn) error {
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return err
		}
		ip, err := netip.ParseAddr(host)
		if err != nil {
			return refuse("cannot read dialed address %q", address)
		}
		return g.CheckIP(ip)
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, _ := net.SplitHostPort(addr)
		if g.hosts[strings.ToLower(strings.TrimSuffix(host, "."))] {
			return d.DialContext(ctx, network, addr)
		}
		return guarded.DialContext(ctx, network, addr)
	}
}
