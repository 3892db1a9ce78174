package sender

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/walhook/walhook/outbox"
)

// AppendBody appends the request body of b to buf: one envelope, or with
// batching (batch_max > 1) a JSON array of envelopes, even of one.
func AppendBody(buf []byte, b *outbox.Batch) []byte {
	opts := &b.Subscription.Delivery
	size := 0
	for i := range b.Events {
		size += len(b.Events[i].Payload) + 256
	}
	buf = slices.Grow(buf, size)
	if !opts.Batched() {
		return AppendEnvelope(buf, &b.Events[0], opts)
	}
	buf = append(buf, '[')
	for i := range b.Events {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = AppendEnvelope(buf, &b.Events[i], opts)
	}
	return append(buf, ']')
}

// AppendEnvelope appends the JSON envelope of e:
//
//	{"id","type","timestamp","resource_id","tenant","sequence","coalesced","data"}
//
// A skinny envelope (payload: skinny, or a payload over max_payload_bytes) has
// "resource_url" instead of "data"; an oversized one also "truncated": true.
func AppendEnvelope(buf []byte, e *outbox.Event, opts *outbox.DeliveryOptions) []byte {
	buf = append(buf, `{"id":`...)
	buf = appendString(buf, e.ID)
	buf = append(buf, `,"type":`...)
	buf = appendString(buf, e.Type)
	buf = append(buf, `,"timestamp":"`...)
	buf = e.CommitTime.UTC().AppendFormat(buf, time.RFC3339Nano)
	buf = append(buf, `","resource_id":`...)
	buf = appendNullable(buf, e.ResourceID)
	buf = append(buf, `,"tenant":`...)
	buf = appendNullable(buf, e.Tenant)
	buf = append(buf, `,"sequence":`...)
	buf = strconv.AppendUint(buf, e.Seq, 10)
	buf = append(buf, `,"coalesced":`...)
	buf = strconv.AppendInt(buf, int64(max(e.Coalesced, 1)), 10)
	truncated := opts.MaxPayloadBytes > 0 && len(e.Payload) > opts.MaxPayloadBytes
	if opts.Payload != outbox.PayloadSkinny && !truncated {
		buf = append(buf, `,"data":`...)
		buf = append(buf, e.Payload...)
		return append(buf, '}')
	}
	buf = append(buf, `,"resource_url":`...)
	buf = appendNullable(buf, ResourceURL(opts.ResourceURL, e.ResourceID))
	if truncated {
		buf = append(buf, `,"truncated":true`...)
	}
	return append(buf, '}')
}

// ResourceURL expands {resource_id} in template; "" when either is empty.
func ResourceURL(template, resourceID string) string {
	if template == "" || resourceID == "" {
		return ""
	}
	return strings.ReplaceAll(template, "{resource_id}", url.PathEscape(resourceID))
}

func appendNullable(buf []byte, s string) []byte {
	if s == "" {
		return append(buf, "null"...)
	}
	return appendString(buf, s)
}

const hex = "0123456789abcdef"

// appendString appends s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendString(buf []byte, s string) []byte {
	buf = append(buf, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			buf = append(buf, s[start:i]...)
			switch c {
			case '"', '\\':
				buf = append(buf, '\\', c)
			case '\n':
				buf = append(buf, '\\', 'n')
			case '\r':
				buf = append(buf, '\\', 'r')
			case '\t':
				buf = append(buf, '\\', 't')
			default:
				buf = append(buf, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			buf = append(buf, s[start:i]...)
			buf = append(buf, `\ufffd`...)
			i += size
			start = i
			continue
		}
		i += size
	}
	buf = append(buf, s[start:]...)
	return append(buf, '"')
}
