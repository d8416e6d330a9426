// Package console is the operator's web page of the grid, served by the
// router: nodes and their devices with state, utilization and memory, each
// model's plan as a picture (which node holds which layers and experts),
// the tokens per second this router generated over the last minute, recent
// failures and re-plans (membership events, plan events, dead letters, the
// router's own failovers) and settlement's lag.
//
// The page is plain HTML, CSS and JavaScript embedded in the binary; it
// polls one JSON document, GET /console/api/state, which the router builds
// from its live view of KV nodes, plans and models, from the tails of
// streams MEMBERSHIP, PLAN_EVENTS and DEADLETTER, and from settlement's
// micro STATS endpoint.
package console

import (
	"context"
	"embed"
	"encoding/json"
	"io/fs"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/router/internal/generate"
	"github.com/tessera-grid/tessera/services/router/internal/grid"
)

//go:embed static
var static embed.FS

// recent is how many events of each stream the console keeps.
const recent = 40

// Console serves the page and its state. Run keeps the stream tails.
type Console struct {
	bus      *bus.Conn
	view     *grid.View
	activity *generate.Activity
	log      *slog.Logger

	membership *tail[wire.MembershipEvent]
	plans      *tail[wire.PlanEvent]
	dead       *tail[DeadLetter]

	mu         sync.Mutex
	settlement Settlement
	asked      time.Time
}

// New returns a console over the router's view and activity.
func New(b *bus.Conn, view *grid.View, activity *generate.Activity, log *slog.Logger) *Console {
	return &Console{
		bus: b, view: view, activity: activity, log: log,
		membership: newTail(subjects.StreamMembership, subjects.MembershipAll, decodeJSON[wire.MembershipEvent]),
		plans:      newTail(subjects.StreamPlanEvents, subjects.PlanEventsAll, decodeJSON[wire.PlanEvent]),
		dead:       newTail(subjects.StreamDeadLetter, subjects.DeadLetterAll, decodeDeadLetter),
	}
}

// Run follows the event streams until ctx ends.
func (c *Console) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { c.membership.run(ctx, c.bus.JS, c.log) })
	wg.Go(func() { c.plans.run(ctx, c.bus.JS, c.log) })
	wg.Go(func() { c.dead.run(ctx, c.bus.JS, c.log) })
	wg.Wait()
}

// Handler serves GET /console (the page and its assets) and
// GET /console/api/state; / redirects to the page.
func (c *Console) Handler() http.Handler {
	mux := http.NewServeMux()
	files, _ := fs.Sub(static, "static")
	assets := http.StripPrefix("/console/", http.FileServerFS(files))
	mux.Handle("GET /console/", assets)
	mux.HandleFunc("GET /console", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/console/", http.StatusFound)
	})
	mux.HandleFunc("GET /console/api/state", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(c.State(r.Context()))
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/console/", http.StatusFound)
	})
	return mux
}

// State is everything the page shows, at one moment.
type State struct {
	Time       time.Time               `json:"time"`
	Nodes      []Node                  `json:"nodes"`
	Models     []Model                 `json:"models"`
	Throughput Throughput              `json:"throughput"`
	Failures   []generate.StageFailure `json:"failures"`
	Membership []wire.MembershipEvent  `json:"membership"`
	PlanEvents []wire.PlanEvent        `json:"plan_events"`
	DeadLetter []DeadLetter            `json:"dead_letters"`
	Settlement Settlement              `json:"settlement"`
	Regions    map[string]int          `json:"regions"`
	States     map[string]int          `json:"states"`
	Devices    map[string]int          `json:"devices"`
}

// Node is one live node as the registry last recorded it.
type Node struct {
	ID           string        `json:"id"`
	State        string        `json:"state"`
	Region       string        `json:"region"`
	Supplier     string        `json:"supplier"`
	JoinedAt     time.Time     `json:"joined_at"`
	LastSeen     time.Time     `json:"last_seen"`
	Quarantine   string        `json:"quarantine_reason,omitempty"`
	QueueDepth   int           `json:"queue_depth"`
	KVTokensFree int64         `json:"kv_tokens_free"`
	MemoryBudget uint64        `json:"memory_budget_bytes"`
	MemoryFree   uint64        `json:"memory_free_bytes"`
	Fragments    int           `json:"fragments"`
	Models       []string      `json:"models"`
	Devices      []wire.Device `json:"devices"`
}

// Model is a model with its current plan.
type Model struct {
	ID      string     `json:"id"`
	Layers  int        `json:"layers"`
	Experts int        `json:"experts,omitempty"`
	Bytes   int64      `json:"bytes"`
	Plan    *wire.Plan `json:"plan"`
}

// Throughput is this router's generated tokens per second.
type Throughput struct {
	// PerSecond holds the last 60 whole seconds, oldest first.
	PerSecond []int64 `json:"per_second"`
	// LastMinute is the average over those 60 seconds.
	LastMinute float64 `json:"last_minute_tok_s"`
	// Last10s is the average over the last 10 of them.
	Last10s float64 `json:"last_10s_tok_s"`
}

// DeadLetter is a dead letter without the message it holds.
type DeadLetter struct {
	Service string    `json:"service"`
	Reason  string    `json:"reason"`
	Subject string    `json:"subject"`
	Error   string    `json:"error"`
	Time    time.Time `json:"time"`
}

// State gathers the page's state now.
func (c *Console) State(ctx context.Context) State {
	st := State{Time: time.Now().UTC(), Regions: map[string]int{}, States: map[string]int{}, Devices: map[string]int{}}
	for _, r := range c.view.Nodes() {
		hb := r.Heartbeat
		n := Node{ID: hb.Node, State: r.State, Region: hb.Region, Supplier: hb.Supplier, JoinedAt: r.JoinedAt, LastSeen: r.LastSeen,
			Quarantine: r.QuarantineReason, QueueDepth: hb.QueueDepth, KVTokensFree: hb.KVTokensFree, MemoryBudget: hb.MemoryBudget,
			MemoryFree: hb.MemoryFree, Fragments: len(hb.Fragments), Models: hb.Models, Devices: hb.Devices}
		if n.Devices == nil {
			n.Devices = []wire.Device{}
		}
		st.Nodes = append(st.Nodes, n)
		st.Regions[n.Region]++
		st.States[n.State]++
		for _, d := range n.Devices {
			st.Devices[d.Kind]++
		}
	}
	slices.SortFunc(st.Nodes, func(a, b Node) int { return strings.Compare(a.ID, b.ID) })
	for _, m := range c.view.Models() {
		st.Models = append(st.Models, Model{ID: m.Manifest.ID, Layers: m.Manifest.Config.Layers, Experts: m.Manifest.Config.Experts, Bytes: m.Manifest.TotalBytes, Plan: m.Plan})
	}
	per := c.activity.TokensPerSecond()
	st.Throughput = Throughput{PerSecond: per, LastMinute: average(per), Last10s: average(per[len(per)-10:])}
	st.Failures = c.activity.Failures()
	st.Membership = c.membership.items()
	st.PlanEvents = c.plans.items()
	st.DeadLetter = c.dead.items()
	st.Settlement = c.settlementStats(ctx)
	// The page reads every list as an array, never null.
	st.Nodes = nonNil(st.Nodes)
	st.Models = nonNil(st.Models)
	st.Failures = nonNil(st.Failures)
	return st
}

func nonNil[T any](v []T) []T {
	if v == nil {
		return []T{}
	}
	return v
}

func average(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	var sum int64
	for _, x := range v {
		sum += x
	}
	return float64(sum) / float64(len(v))
}

func decodeJSON[T any](data []byte) (T, error) {
	var v T
	err := json.Unmarshal(data, &v)
	return v, err
}

func decodeDeadLetter(data []byte) (DeadLetter, error) {
	var d wire.DeadLetter
	if err := json.Unmarshal(data, &d); err != nil {
		return DeadLetter{}, err
	}
	return DeadLetter{Service: d.Service, Reason: d.Reason, Subject: d.Subject, Error: d.Error, Time: d.Time}, nil
}
