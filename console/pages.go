package console

import (
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"time"

	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
)

// subscriptionRow is one line of the overview.
type subscriptionRow struct {
	api.View
	Disabled      bool
	Pending       int64
	Parked, Dead  int64
	Rate          string // success rate of the recent attempts; "-" for none
	Failing       bool   // below 90%
	LastFailure   *time.Time
	LastError     string
	LastSuccessAt *time.Time
}

type overviewData struct {
	Stats         pgstore.SlotStats
	LagSeconds    float64
	Reported      *pgstore.Report
	Chart         chart
	Subscriptions []subscriptionRow
	More          bool // more subscriptions than the page shows (maxOverview)
}

// maxOverview bounds the overview's rows (and its queries): past it, the API
// lists the rest.
const maxOverview = 500

func (c *Console) overview(r *http.Request) (string, *view, error) {
	ctx := r.Context()
	var subs []api.View
	// The config file's and the first maxOverview+1 API subscriptions: one
	// more than shown says that there are more.
	if err := c.call(r, http.MethodGet, "/v1/subscriptions?limit="+strconv.Itoa(maxOverview+1), &subs); err != nil {
		return "", nil, err
	}
	slot, stored, err := c.cfg.Source.Stats(ctx)
	if err != nil {
		return "", nil, err
	}
	report, err := c.cfg.Source.ReadReport(ctx)
	if err != nil {
		return "", nil, err
	}
	sums, err := c.cfg.Source.AttemptSummaries(ctx)
	if err != nil {
		return "", nil, err
	}
	sort.SliceStable(subs, func(i, j int) bool { return subs[i].ID < subs[j].ID })
	more := len(subs) > maxOverview
	subs = subs[:min(len(subs), maxOverview)]
	ids := make([]string, len(subs))
	for i, s := range subs {
		ids[i] = s.ID
	}
	outcomes, err := c.cfg.Source.RecentOutcomes(ctx, ids, recentAttempts)
	if err != nil {
		return "", nil, err
	}
	d := overviewData{Stats: slot, Reported: report, More: more}
	if report != nil {
		d.LagSeconds = report.LagSeconds
	}
	d.Chart = newChart(c.cfg.Lag.Samples(), time.Now(), time.Hour, 600, 120)
	for _, s := range subs {
		row := subscriptionRow{View: s, Disabled: s.DisabledAt != nil, Parked: stored[s.ID].Parked, Dead: stored[s.ID].Dead, Rate: "-"}
		if report != nil {
			row.Pending = report.Subscriptions[s.ID].Pending
		}
		if o := outcomes[s.ID]; o.Attempts > 0 {
			rate := float64(o.Delivered) / float64(o.Attempts)
			row.Rate, row.Failing = fmt.Sprintf("%.0f%% of %d", 100*rate, o.Attempts), rate < 0.9
		}
		if sum, ok := sums[s.ID]; ok {
			row.LastSuccessAt, row.LastFailure = sum.LastSuccess, sum.LastFailure
			if sum.LastFailureReason != nil {
				row.LastError = *sum.LastFailureReason
			}
		}
		d.Subscriptions = append(d.Subscriptions, row)
	}
	return "overview", &view{Title: "Overview", Data: d}, nil
}

type subscriptionData struct {
	Sub      api.View
	Attempts api.AttemptPage
	Status   string // the filters
	Since    string
	Next     string // the next page's URL
}

// sinces are the attempt filter's time choices.
var sinces = map[string]time.Duration{"15m": 15 * time.Minute, "1h": time.Hour, "24h": 24 * time.Hour, "72h": 72 * time.Hour}

func (c *Console) subscription(r *http.Request) (string, *view, error) {
	id := r.PathValue("id")
	var sub api.View
	if err := c.call(r, http.MethodGet, "/v1/subscriptions/"+url.PathEscape(id), &sub); err != nil {
		return "", nil, err
	}
	q := r.URL.Query()
	d := subscriptionData{Sub: sub, Status: q.Get("status"), Since: q.Get("since")}
	filter := url.Values{}
	switch d.Status {
	case "failed", "succeeded":
		filter.Set("status", d.Status)
	default:
		d.Status = ""
	}
	if since, ok := sinces[d.Since]; ok {
		filter.Set("since", time.Now().Add(-since).UTC().Format(time.RFC3339))
	} else {
		d.Since = ""
	}
	if cur := q.Get("cursor"); cur != "" {
		filter.Set("cursor", cur)
	}
	if err := c.call(r, http.MethodGet, "/v1/subscriptions/"+url.PathEscape(id)+"/attempts?"+filter.Encode(), &d.Attempts); err != nil {
		return "", nil, err
	}
	if d.Attempts.NextCursor != nil {
		next := url.Values{"cursor": {*d.Attempts.NextCursor}}
		if d.Status != "" {
			next.Set("status", d.Status)
		}
		if d.Since != "" {
			next.Set("since", d.Since)
		}
		d.Next = "/console/subscriptions/" + url.PathEscape(id) + "?" + next.Encode()
	}
	return "subscription", &view{Title: "Subscription " + id, Data: d}, nil
}

func (c *Console) enable(r *http.Request) (string, *view, error) {
	id := r.PathValue("id")
	if err := c.call(r, http.MethodPost, "/v1/subscriptions/"+url.PathEscape(id)+"/enable", nil); err != nil {
		return "", nil, err
	}
	return "", &view{Data: "/console/subscriptions/" + url.PathEscape(id)}, nil
}

// confirmData is a confirmation page: what is about to happen, and the form
// that does it.
type confirmData struct {
	Question string
	Detail   string
	Action   string // the form's URL
	Button   string
	Back     string
}

func (c *Console) confirmRotate(r *http.Request) (string, *view, error) {
	id := r.PathValue("id")
	var sub api.View
	if err := c.call(r, http.MethodGet, "/v1/subscriptions/"+url.PathEscape(id), &sub); err != nil {
		return "", nil, err
	}
	back := "/console/subscriptions/" + url.PathEscape(id)
	return "confirm", &view{Title: "Rotate the secret", Data: confirmData{
		Question: "Rotate the signing secret of " + id + "?",
		Detail:   "A new secret is made and shown once. The old one keeps signing beside it for the rotation overlap, so the receiver can switch without losing a hook.",
		Action:   back + "/rotate", Button: "Rotate the secret", Back: back}}, nil
}

// doneData is the page after an action.
type doneData struct {
	Message string
	Secret  string // a new secret, shown once
	Back    string
}

func (c *Console) rotate(r *http.Request) (string, *view, error) {
	id := r.PathValue("id")
	var got struct {
		Secret string `json:"secret"`
	}
	if err := c.call(r, http.MethodPost, "/v1/subscriptions/"+url.PathEscape(id)+"/rotate-secret", &got); err != nil {
		return "", nil, err
	}
	return "done", &view{Title: "Secret rotated", Data: doneData{
		Message: "The new secret of " + id + " is below. It is not shown again: give it to the receiver now.",
		Secret:  got.Secret, Back: "/console/subscriptions/" + url.PathEscape(id)}}, nil
}

type deadLettersData struct {
	Subscription string
	Letters      []outbox.DeadLetterRow
}

func (c *Console) deadLetters(r *http.Request) (string, *view, error) {
	d := deadLettersData{Subscription: r.URL.Query().Get("subscription")}
	q := url.Values{"limit": {"200"}}
	if d.Subscription != "" {
		q.Set("subscription", d.Subscription)
	}
	if err := c.call(r, http.MethodGet, "/v1/dead-letters?"+q.Encode(), &d.Letters); err != nil {
		return "", nil, err
	}
	return "deadletters", &view{Title: "Dead letters", Data: d}, nil
}

func (c *Console) confirmReplay(r *http.Request) (string, *view, error) {
	id := r.PathValue("id")
	back := "/console/dead-letters"
	if s := r.URL.Query().Get("subscription"); s != "" {
		back += "?" + url.Values{"subscription": {s}}.Encode()
	}
	return "confirm", &view{Title: "Replay a dead letter", Data: confirmData{
		Question: "Replay dead letter " + id + "?",
		Detail:   "It is delivered again, with its original webhook-id and sequence, after the events of its resource already pending.",
		Action:   "/console/dead-letters/" + url.PathEscape(id) + "/replay", Button: "Replay", Back: back}}, nil
}

func (c *Console) replay(r *http.Request) (string, *view, error) {
	id := r.PathValue("id")
	if err := c.call(r, http.MethodPost, "/v1/dead-letters/"+url.PathEscape(id)+"/replay", nil); err != nil {
		return "", nil, err
	}
	return "done", &view{Title: "Replayed", Data: doneData{
		Message: "Dead letter " + id + " is on its way again.", Back: "/console/dead-letters"}}, nil
}
