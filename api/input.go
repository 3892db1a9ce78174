package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/walhook/walhook/outbox"
)

// Bounds of the API's input (docs/subscriptions.md).
const (
	MaxBodyBytes    = 64 << 10                // a request body; larger is 413
	MaxTargetURLLen = outbox.MostTargetURLLen // target_url, bytes
	MaxTextLen      = outbox.MostTextLen      // ids, tenants, query values, bytes
)

// decode reads a JSON request body into v: it must be application/json, valid
// UTF-8 without control characters in any string, one JSON value with no
// unknown field and nothing after it. Errors name the field.
func decode(r *http.Request, v any) error {
	if err := checkContentType(r.Header.Get("Content-Type")); err != nil {
		return err
	}
	raw, err := io.ReadAll(r.Body)
	if tooLarge := (*http.MaxBytesError)(nil); errors.As(err, &tooLarge) {
		return fail(http.StatusRequestEntityTooLarge, "body: larger than %d bytes", MaxBodyBytes)
	}
	if err != nil {
		return fail(http.StatusBadRequest, "body: %v", err)
	}
	return decodeJSON(raw, v)
}

func checkContentType(ct string) error {
	if ct == "" {
		return fail(http.StatusUnsupportedMediaType, "Content-Type: want application/json")
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil || mt != "application/json" {
		return fail(http.StatusUnsupportedMediaType, "Content-Type: %q, want application/json", ct)
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return fail(http.StatusUnsupportedMediaType, "Content-Type: charset %q, want utf-8", cs)
	}
	return nil
}

// decodeJSON is decode after the body was read: pure, and fuzzed.
func decodeJSON(raw []byte, v any) error {
	if len(bytes.TrimSpace(raw)) == 0 {
		return fail(http.StatusBadRequest, "body: empty, want a JSON object")
	}
	if err := checkStrings(raw); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &te) && te.Field != "":
			return fail(http.StatusBadRequest, "%s: want %s, not a JSON %s", fieldName(te.Field), typeName(te.Type.Kind().String()), te.Value)
		case errors.As(err, &te):
			return fail(http.StatusBadRequest, "body: want a JSON object, not a JSON %s", te.Value)
		case errors.As(err, &se):
			return fail(http.StatusBadRequest, "body: invalid JSON at byte %d: %v", se.Offset, err)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			return fail(http.StatusBadRequest, "%s: unknown field", strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`))
		}
		return fail(http.StatusBadRequest, "body: invalid JSON: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fail(http.StatusBadRequest, "body: data after the JSON value at byte %d", dec.InputOffset())
	}
	return nil
}

// fieldName is the JSON key of a decoding error's field path (Options.timeout → timeout).
func fieldName(path string) string {
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		return path[i+1:]
	}
	return path
}

func typeName(kind string) string {
	switch kind {
	case "int", "int64", "float64":
		return "a whole number"
	case "string", "struct":
		return "a string"
	case "slice":
		return "a list"
	case "bool":
		return "true or false"
	}
	return kind
}

// checkStrings walks raw's tokens and refuses a string (key or value) that is
// not valid UTF-8 or holds a control character (NUL included), naming the
// top-level key it belongs to. encoding/json would turn invalid UTF-8 into
// U+FFFD silently, and PostgreSQL refuses NUL in text.
func checkStrings(raw []byte) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	type frame struct{ object, wantKey bool }
	var stack []frame
	field, top := "body", "body" // field: the key a string belongs to, one level deep (headers.X-Api-Key)
	valueDone := func() {
		if n := len(stack); n > 0 && stack[n-1].object {
			stack[n-1].wantKey = true
		}
	}
	for prev := int64(0); ; {
		tok, err := dec.Token()
		if err != nil {
			return nil // io.EOF, or a syntax error that the decode proper reports
		}
		end := dec.InputOffset()
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{':
				stack = append(stack, frame{object: true, wantKey: true})
			case '[':
				stack = append(stack, frame{})
			default:
				stack = stack[:len(stack)-1]
				valueDone()
				switch len(stack) {
				case 1:
					field = "body"
				case 2:
					field = top
				}
			}
		case string:
			isKey := len(stack) > 0 && stack[len(stack)-1].object && stack[len(stack)-1].wantKey
			switch {
			case isKey && len(stack) == 1:
				field, top = t, t
			case isKey && len(stack) == 2 && stack[0].object && !outbox.HasControl(t):
				field = top + "." + t
			}
			if !utf8.Valid(raw[prev:end]) || outbox.HasControl(t) {
				what := "not valid UTF-8 or holds a control character"
				if isKey {
					return fail(http.StatusBadRequest, "body: a key %s", what)
				}
				return fail(http.StatusBadRequest, "%s: %s", field, what)
			}
			if isKey {
				stack[len(stack)-1].wantKey = false
			} else {
				valueDone()
			}
		default:
			valueDone()
		}
		prev = end
	}
}

// checkText checks a value from a path or query (outbox.CheckText): a 400.
func checkText(field, v string) error {
	if err := outbox.CheckText(field, v); err != nil {
		return fail(http.StatusBadRequest, "%v", err)
	}
	return nil
}

// query parses r's query: only the allowed keys, each at most once, each
// value checked with checkText.
func query(r *http.Request, allowed ...string) (url.Values, error) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, fail(http.StatusBadRequest, "query: %v", err)
	}
	for k, vs := range q {
		known := false
		for _, a := range allowed {
			known = known || a == k
		}
		if !known {
			if checkText("query", k) != nil {
				return nil, fail(http.StatusBadRequest, "query: an unknown key (want %s)", strings.Join(allowed, ", "))
			}
			return nil, fail(http.StatusBadRequest, "%s: unknown query key (want %s)", k, strings.Join(allowed, ", "))
		}
		if len(vs) > 1 {
			return nil, fail(http.StatusBadRequest, "%s: given %d times", k, len(vs))
		}
		if err := checkText(k, vs[0]); err != nil {
			return nil, err
		}
	}
	return q, nil
}

// pathID is the {id} of the path, checked.
func pathID(r *http.Request) (string, error) {
	id := r.PathValue("id")
	if id == "" {
		return "", fail(http.StatusBadRequest, "id: empty")
	}
	return id, checkText("id", id)
}

// parseCount reads a whole decimal number in [least, most]: "5abc", "+5",
// " 5" and "0x5" are refused.
func parseCount(field, v string, least, most int64) (int64, error) {
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || strconv.FormatInt(n, 10) != v || n < least || n > most {
		return 0, fail(http.StatusBadRequest, "%s: %q is not a whole number from %d to %d", field, v, least, most)
	}
	return n, nil
}

// checkRequest checks the fields of a create or patch body that neither the
// patterns' check nor the options' Resolve looks at: tenant and the URLs.
func checkRequest(req *Request) error {
	if req.Tenant != nil {
		if err := checkText("tenant", *req.Tenant); err != nil {
			return err
		}
	}
	if req.TargetURL != "" {
		if err := outbox.CheckTargetURL("target_url", req.TargetURL); err != nil {
			return fail(http.StatusBadRequest, "%v", err)
		}
	}
	if req.ResourceURL != nil && len(*req.ResourceURL) > MaxTargetURLLen {
		return fail(http.StatusBadRequest, "resource_url: longer than %d bytes", MaxTargetURLLen)
	}
	return nil
}
