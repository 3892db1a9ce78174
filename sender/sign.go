package sender

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/walhook/walhook/outbox"
)

// Prefixes of walhook's keys, as Standard Webhooks spells them.
const (
	SecretPrefix     = "whsec_" // v1: base64 of the HMAC key
	PrivateKeyPrefix = "whsk_"  // v1a: base64 of the ed25519 seed (32 bytes; the 64-byte private key is accepted too)
	PublicKeyPrefix  = "whpk_"  // v1a: base64 of the ed25519 public key (32 bytes), for receivers
)

// ParseSecret decodes a "whsec_<base64>" secret into its key. The error never
// contains the secret.
func ParseSecret(secret string) ([]byte, error) {
	enc, ok := strings.CutPrefix(secret, SecretPrefix)
	if !ok {
		return nil, errors.New(`secret must start with "whsec_"`)
	}
	key, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		return nil, errors.New(`secret must be "whsec_" followed by base64`)
	}
	if len(key) < 16 {
		return nil, errors.New("secret key must be at least 16 bytes")
	}
	return key, nil
}

// ParsePrivateKey decodes a "whsk_<base64>" key: an ed25519 seed of 32 bytes,
// or a private key of 64 whose second half is its public key. The error never
// contains the key.
func ParsePrivateKey(secret string) (ed25519.PrivateKey, error) {
	enc, ok := strings.CutPrefix(secret, PrivateKeyPrefix)
	if !ok {
		return nil, errors.New(`key must start with "whsk_"`)
	}
	raw, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		return nil, errors.New(`key must be "whsk_" followed by base64`)
	}
	switch len(raw) {
	case ed25519.SeedSize:
		return ed25519.NewKeyFromSeed(raw), nil
	case ed25519.PrivateKeySize:
		key := ed25519.NewKeyFromSeed(raw[:ed25519.SeedSize])
		if !bytes.Equal(key[ed25519.SeedSize:], raw[ed25519.SeedSize:]) {
			return nil, errors.New("whsk_ key: its public half does not belong to its seed")
		}
		return key, nil
	}
	return nil, fmt.Errorf("whsk_ key must be an ed25519 seed of %d bytes (or a private key of %d)", ed25519.SeedSize, ed25519.PrivateKeySize)
}

// schemeOf says which scheme a key signs with, by its prefix.
func schemeOf(key string) string {
	switch {
	case strings.HasPrefix(key, SecretPrefix):
		return outbox.SchemeV1
	case strings.HasPrefix(key, PrivateKeyPrefix):
		return outbox.SchemeV1a
	}
	return ""
}

// CheckSecret checks a subscription's secret against its schemes: one key per
// scheme, space-separated (whsec_ for v1, whsk_ for v1a), and no other. The
// error never contains a key.
func CheckSecret(secret string, schemes outbox.Schemes) error {
	have := map[string]bool{}
	for key := range strings.FieldsSeq(secret) {
		scheme := schemeOf(key)
		switch {
		case scheme == "":
			return errors.New(`each key must start with "whsec_" (v1) or "whsk_" (v1a)`)
		case have[scheme]:
			return fmt.Errorf("two keys for signature %s", scheme)
		case !schemes.Has(scheme):
			return fmt.Errorf("a key for signature %s, which the subscription does not use (signature: %s)", scheme, strings.Join(schemes, ", "))
		}
		have[scheme] = true
		var err error
		if scheme == outbox.SchemeV1 {
			_, err = ParseSecret(key)
		} else {
			_, err = ParsePrivateKey(key)
		}
		if err != nil {
			return err
		}
	}
	for _, s := range schemes {
		if !have[s] {
			return fmt.Errorf("no key for signature %s (%s)", s, map[string]string{outbox.SchemeV1: "whsec_…", outbox.SchemeV1a: "whsk_…"}[s])
		}
	}
	return nil
}

// NewKey returns a fresh key for scheme: whsec_ and 32 random bytes for v1,
// whsk_ and a random ed25519 seed for v1a.
func NewKey(scheme string) string {
	var b [32]byte
	rand.Read(b[:])
	if scheme == outbox.SchemeV1a {
		return PrivateKeyPrefix + base64.StdEncoding.EncodeToString(b[:])
	}
	return SecretPrefix + base64.StdEncoding.EncodeToString(b[:])
}

// NewSecret returns a fresh secret for schemes: a key for each.
func NewSecret(schemes outbox.Schemes) string {
	keys := make([]string, len(schemes))
	for i, s := range schemes {
		keys[i] = NewKey(s)
	}
	return strings.Join(keys, " ")
}

// FitSecret makes secret fit schemes: keys of schemes no longer used go, a
// fresh key comes for each scheme that has none. It reports whether it
// added a key.
func FitSecret(secret string, schemes outbox.Schemes) (fitted string, added bool) {
	var keys []string
	have := map[string]bool{}
	for key := range strings.FieldsSeq(secret) {
		if s := schemeOf(key); schemes.Has(s) && !have[s] {
			have[s] = true
			keys = append(keys, key)
		}
	}
	for _, s := range schemes {
		if !have[s] {
			keys = append(keys, NewKey(s))
			added = true
		}
	}
	return strings.Join(keys, " "), added
}

// PublicKey is the whpk_ public key of the whsk_ key in secret; "" when it has none.
func PublicKey(secret string) string {
	for key := range strings.FieldsSeq(secret) {
		if schemeOf(key) != outbox.SchemeV1a {
			continue
		}
		priv, err := ParsePrivateKey(key)
		if err != nil {
			return ""
		}
		return PublicKeyPrefix + base64.StdEncoding.EncodeToString(priv.Public().(ed25519.PublicKey))
	}
	return ""
}

// Sign returns the Standard Webhooks signature "v1,<base64 HMAC-SHA256>" of
// "id.timestamp.body" under key.
func Sign(key []byte, id string, timestamp int64, body []byte) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(id))
	m.Write([]byte{'.'})
	m.Write(strconv.AppendInt(nil, timestamp, 10))
	m.Write([]byte{'.'})
	m.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// SignV1a returns the Standard Webhooks signature "v1a,<base64 ed25519>" of
// "id.timestamp.body" under key.
func SignV1a(key ed25519.PrivateKey, id string, timestamp int64, body []byte) string {
	msg := make([]byte, 0, len(id)+len(body)+22)
	msg = append(msg, id...)
	msg = append(msg, '.')
	msg = strconv.AppendInt(msg, timestamp, 10)
	msg = append(msg, '.')
	msg = append(msg, body...)
	return "v1a," + base64.StdEncoding.EncodeToString(ed25519.Sign(key, msg))
}

// signatures appends the signatures of secret's keys whose schemes are in
// schemes. The error never contains a key.
func signatures(sigs []string, secret string, schemes outbox.Schemes, id string, ts int64, body []byte) ([]string, error) {
	for rest := secret; rest != ""; { // not strings.FieldsSeq: this is per request, and its closure allocates
		var key string
		key, rest, _ = strings.Cut(rest, " ")
		if key == "" {
			continue
		}
		switch scheme := schemeOf(key); {
		case scheme == "":
			return nil, errors.New(`secret: each key must start with "whsec_" or "whsk_"`)
		case !schemes.Has(scheme):
		case scheme == outbox.SchemeV1:
			k, err := ParseSecret(key)
			if err != nil {
				return nil, err
			}
			sigs = append(sigs, Sign(k, id, ts, body))
		default:
			k, err := ParsePrivateKey(key)
			if err != nil {
				return nil, err
			}
			sigs = append(sigs, SignV1a(k, id, ts, body))
		}
	}
	return sigs, nil
}
