package api

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/walhook/walhook/outbox"
)

// Bounds of attempt-log reads (docs/attempts.md).
const (
	attemptReads       = 2
	attemptReadTimeout = 5 * time.Second
)

// AttemptPage is one page of the attempt log, newest first. NextCursor, when
// set, is the cursor query value of the next (older) page.
type AttemptPage struct {
	Attempts   []outbox.AttemptRow `json:"attempts"`
	NextCursor *string             `json:"next_cursor"`
}

// subscriptionAttempts is GET /v1/subscriptions/{id}/attempts.
func (a *API) subscriptionAttempts(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	static, row, err := a.find(r, c)
	if err != nil {
		return 0, nil, err
	}
	f := outbox.AttemptFilter{}
	if static != nil {
		f.Subscription = static.ID
	} else {
		f.Subscription = row.ID
	}
	return a.attempts(r, c, f, "status", "since", "until", "event_id", "cursor", "limit")
}

// eventAttempts is GET /v1/events/{event_id}/attempts: the attempts that
// carried the event, to the caller's subscriptions.
func (a *API) eventAttempts(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	id := r.PathValue("event_id")
	if err := checkText("event_id", id); err != nil {
		return 0, nil, err
	}
	if id == "" || len(id) > 1024 {
		return 0, nil, fail(http.StatusBadRequest, "event_id: must be 1 to 1024 bytes")
	}
	return a.attempts(r, c, outbox.AttemptFilter{EventID: id}, "status", "since", "until", "cursor", "limit")
}

// attempts lists a page of f, with the filters of the query.
func (a *API) attempts(r *http.Request, c caller, f outbox.AttemptFilter, allowed ...string) (int, any, error) {
	q, err := query(r, allowed...)
	if err != nil {
		return 0, nil, err
	}
	if id := q.Get("event_id"); id != "" {
		f.EventID = id
	}
	switch s := q.Get("status"); s {
	case "":
	case "failed", "succeeded":
		failed := s == "failed"
		f.Failed = &failed
	default:
		code, err := parseCount("status", s, 100, 599)
		if err != nil {
			return 0, nil, fail(http.StatusBadRequest, "status: %q is not failed, succeeded or an HTTP status code", s)
		}
		f.Status = int(code)
	}
	if f.Since, err = parseTime("since", q.Get("since")); err != nil {
		return 0, nil, err
	}
	if f.Until, err = parseTime("until", q.Get("until")); err != nil {
		return 0, nil, err
	}
	if cur := q.Get("cursor"); cur != "" {
		if f.Before, err = parseCount("cursor", cur, 1, 1<<63-1); err != nil {
			return 0, nil, fail(http.StatusBadRequest, "cursor: %q is not a cursor this API returned", cur)
		}
	}
	limit := int64(50)
	if l := q.Get("limit"); l != "" {
		if limit, err = parseCount("limit", l, 1, 1000); err != nil {
			return 0, nil, err
		}
	}
	if !c.admin {
		t := c.tenant
		f.Owner = &t
	}
	// The attempt log is big and shares the pool with delivery's writes: at
	// most attemptReads queries at once, each within attemptReadTimeout.
	select {
	case a.attemptReads <- struct{}{}:
		defer func() { <-a.attemptReads }()
	default:
		return 0, nil, fail(http.StatusServiceUnavailable, "too many attempt-log queries at once: try again")
	}
	ctx, cancel := context.WithTimeout(r.Context(), attemptReadTimeout)
	defer cancel()
	list, next, err := a.cfg.Store.ListAttempts(ctx, f, int(limit))
	if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil && r.Context().Err() == nil {
		return 0, nil, fail(http.StatusServiceUnavailable, "the attempt-log query took over %s: narrow it (since, until, status)", attemptReadTimeout)
	}
	if err != nil {
		return 0, nil, err
	}
	page := AttemptPage{Attempts: list}
	if page.Attempts == nil {
		page.Attempts = []outbox.AttemptRow{}
	}
	if next > 0 {
		cur := strconv.FormatInt(next, 10)
		page.NextCursor = &cur
	}
	return http.StatusOK, page, nil
}
