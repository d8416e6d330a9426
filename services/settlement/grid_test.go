package settlement_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
	"github.com/tessera-grid/tessera/services/settlement/internal/clickhousetest"
	"github.com/tessera-grid/tessera/services/settlement/internal/ledger"
)

var chServer *clickhousetest.Server

func TestMain(m *testing.M) { os.Exit(clickhousetest.Main(m, &chServer)) }

// checkFor polls f until it returns nil or timeout passes.
func checkFor(t testing.TB, timeout, interval time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", timeout, err)
		}
		time.Sleep(interval)
	}
}

// priceBook is the book the tests settle with; charge and earning compute
// the same prices independently.
const priceBook = `{
  "version": 4,
  "currency": "USD",
  "models": {"stories260k": {"prompt_per_1k_micros": 150, "generated_per_1k_micros": 600}, "*": {"prompt_per_1k_micros": 1000, "generated_per_1k_micros": 3000}},
  "devices": {"gpu": {"per_million_layer_tokens_micros": 40000, "per_gpu_second_micros": 250}, "cpu": {"per_million_layer_tokens_micros": 5000, "per_gpu_second_micros": 10}}
}`

func charge(ev *wire.UsageEvent) int64 {
	pp, gp := int64(1000), int64(3000)
	if ev.Model == "stories260k" {
		pp, gp = 150, 600
	}
	return (ev.PromptTokens*pp + ev.GeneratedTokens*gp + 500) / 1000
}

func earning(ev *wire.UsageEvent) int64 {
	lt, gs := int64(5000), int64(10)
	if ev.DeviceType == "gpu" {
		lt, gs = 40000, 250
	}
	return (ev.LayerTokens*lt + ev.ComputeUS*gs + 500000) / 1000000
}

// node is an executor identity: its id, supplier and signing key.
type node struct {
	id, supplier, device string
	signer               *usagesig.Signer
}

func newNode(t testing.TB, id, supplier, device string) node {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	s, err := usagesig.FromKeyPair(kp)
	if err != nil {
		t.Fatal(err)
	}
	return node{id: id, supplier: supplier, device: device, signer: s}
}

// events makes n signed usage events of nd for customers and models in
// turn, numbered from first so that ids stay unique across calls.
func (nd node) events(t testing.TB, first, n int, customers, models []string, end time.Time) []wire.UsageEvent {
	t.Helper()
	evs := make([]wire.UsageEvent, n)
	for i := range evs {
		k := first + i
		head := k%3 == 0
		ev := wire.UsageEvent{
			ID: fmt.Sprintf("%s-ev-%d", nd.id, k), Request: fmt.Sprintf("req-%d", k), Customer: customers[k%len(customers)],
			Supplier: nd.supplier, Node: nd.id, Model: models[k%len(models)], Fragment: "layers[0,3)",
			LayerTokens: int64(3 * (20 + k%97)), Messages: int64(1 + k%5), FLOPs: int64(1000 * k), DeviceType: nd.device,
			ComputeUS: int64(500 + k%3001), Start: end.Add(-time.Duration(1+k%50) * time.Millisecond), End: end,
		}
		if head {
			ev.PromptTokens, ev.GeneratedTokens = int64(5+k%211), int64(1+k%67)
		}
		evs[i] = ev
	}
	// Sign in batches of up to 64, as an executor flushing its buffer would.
	for i := 0; i < n; i += 64 {
		if err := nd.signer.SignBatch(evs[i:min(i+64, n)]); err != nil {
			t.Fatal(err)
		}
	}
	return evs
}

// totals sums what tests compare with the ledger.
type totals struct {
	Events, PromptTokens, GeneratedTokens, LayerTokens, ChargeMicros, EarningMicros int64
}

func (s *totals) add(evs ...wire.UsageEvent) {
	for i := range evs {
		e := &evs[i]
		s.Events++
		s.PromptTokens += e.PromptTokens
		s.GeneratedTokens += e.GeneratedTokens
		s.LayerTokens += e.LayerTokens
		s.ChargeMicros += charge(e)
		s.EarningMicros += earning(e)
	}
}

// grid is one NATS server with JetStream, one ClickHouse database and the
// settlement service between them.
type grid struct {
	t      testing.TB
	ns     *server.Server
	conn   *bus.Conn
	ch     *clickhousetest.Server
	db     string
	cfg    settlement.Config
	keys   settlement.KeyResolver
	ledger *ledger.Ledger

	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan error
}

// newGrid starts NATS and bootstraps its streams; ch is the ClickHouse
// server to use (the shared one when nil).
func newGrid(t testing.TB, ch *clickhousetest.Server) *grid {
	t.Helper()
	if ch == nil {
		ch = clickhousetest.Require(t, chServer)
	}
	ns, err := bus.StartEmbedded(bus.EmbedOptions{StoreDir: filepath.Join(t.TempDir(), "nats"), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	return newGridOn(t, ch, ns, config.NATS{})
}

func newGridOn(t testing.TB, ch *clickhousetest.Server, ns *server.Server, nc config.NATS) *grid {
	t.Helper()
	ctx := context.Background()
	conn, err := bus.Connect(ctx, nc, ns, "settlement-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Close)
	if err := bus.Bootstrap(ctx, conn.JS, 1); err != nil {
		t.Fatal(err)
	}
	db := ch.Database(t)
	prices := filepath.Join(t.TempDir(), "prices.json")
	if err := os.WriteFile(prices, []byte(priceBook), 0o644); err != nil {
		t.Fatal(err)
	}
	led, err := ledger.Open(ledger.Options{Addr: []string{ch.Addr()}, Database: db})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = led.Close() })
	g := &grid{t: t, ns: ns, conn: conn, ch: ch, db: db, ledger: led, cfg: settlement.Config{
		ClickHouseAddr: []string{ch.Addr()}, ClickHouseDatabase: db, ClickHouseUser: "default",
		BatchRows: 500, BatchWait: 50 * time.Millisecond, Consumer: "settlement", AckWait: 30 * time.Second,
		RetryMax: 500 * time.Millisecond, PriceFile: prices, CustomerStreams: true,
		RollupInterval: 100 * time.Millisecond, VerifyCache: 4096,
	}}
	t.Cleanup(g.stop)
	return g
}

// register puts nd's record into KV nodes, as the registry does.
func (g *grid) register(nd node) {
	g.t.Helper()
	kv, err := g.conn.JS.KeyValue(context.Background(), subjects.BucketNodes)
	if err != nil {
		g.t.Fatal(err)
	}
	rec := wire.NodeRecord{Heartbeat: wire.Heartbeat{Node: nd.id, Supplier: nd.supplier, PublicKey: nd.signer.PublicKey(), State: wire.NodeReady, Time: time.Now()}, State: wire.NodeReady}
	b, _ := json.Marshal(rec)
	if _, err := kv.Put(context.Background(), nd.id, b); err != nil {
		g.t.Fatal(err)
	}
}

// start runs settlement in this process until stop.
func (g *grid) start() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cancel != nil {
		g.t.Fatal("settlement already runs")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	cfg, deps := g.cfg, settlement.Deps{Bus: g.conn, Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})), Keys: g.keys}
	go func() { done <- settlement.Run(ctx, cfg, deps) }()
	g.cancel, g.done = cancel, done
}

// stop cancels settlement's context, as a shutdown at a random point does.
func (g *grid) stop() {
	g.mu.Lock()
	cancel, done := g.cancel, g.done
	g.cancel, g.done = nil, nil
	g.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			g.t.Errorf("settlement.Run: %v", err)
		}
	case <-time.After(30 * time.Second):
		g.t.Fatal("settlement.Run did not return 30s after cancel")
	}
}

// publish publishes events as an executor does and waits for the stream to
// store them.
func (g *grid) publish(evs []wire.UsageEvent) {
	g.t.Helper()
	if err := g.tryPublish(evs); err != nil {
		g.t.Fatal(err)
	}
}

// tryPublish is publish for goroutines other than the test's.
func (g *grid) tryPublish(evs []wire.UsageEvent) error {
	for i := range evs {
		m, err := usagesig.Message(&evs[i])
		if err != nil {
			return err
		}
		if _, err := g.conn.JS.PublishMsgAsync(m); err != nil {
			return err
		}
	}
	select {
	case <-g.conn.JS.PublishAsyncComplete():
		return nil
	case <-time.After(60 * time.Second):
		return fmt.Errorf("%d publishes not acknowledged", g.conn.JS.PublishAsyncPending())
	}
}

// waitSettled waits until the ledger holds n events.
func (g *grid) waitSettled(n int64, timeout time.Duration) {
	g.t.Helper()
	checkFor(g.t, timeout, 20*time.Millisecond, func() error {
		tt, err := g.ledger.TableTotals(context.Background(), "usage_events")
		if err != nil {
			return err
		}
		if tt.Events != n {
			rows, seqs, ids, _ := g.ledger.DistinctSeqs(context.Background())
			return fmt.Errorf("%d events settled, want %d (%d rows, %d distinct seqs, %d distinct ids)", tt.Events, n, rows, seqs, ids)
		}
		return nil
	})
}

// checkLedger asserts that the ledger holds exactly want: no event lost or
// counted twice, the same token and money sums, and rollups that agree.
func (g *grid) checkLedger(want totals) {
	g.t.Helper()
	ctx := context.Background()
	rows, seqs, ids, err := g.ledger.DistinctSeqs(ctx)
	if err != nil {
		g.t.Fatal(err)
	}
	if int64(rows) != want.Events || seqs != rows || ids != rows {
		g.t.Fatalf("ledger: %d rows, %d distinct seqs, %d distinct ids; want %d of each", rows, seqs, ids, want.Events)
	}
	got, err := g.ledger.TableTotals(ctx, "usage_events")
	if err != nil {
		g.t.Fatal(err)
	}
	if totals(got) != want {
		g.t.Fatalf("ledger totals %+v\nwant %+v", got, want)
	}
	checkFor(g.t, 20*time.Second, 50*time.Millisecond, func() error {
		for _, table := range []string{"usage_hourly_customer", "usage_hourly_supplier", "usage_hourly_model"} {
			r, err := g.ledger.TableTotals(ctx, table)
			if err != nil {
				return err
			}
			if r.Events != want.Events || r.LayerTokens != want.LayerTokens {
				return fmt.Errorf("%s: %+v, want %+v", table, r, want)
			}
			if table != "usage_hourly_supplier" && (r.PromptTokens != want.PromptTokens || r.ChargeMicros != want.ChargeMicros) {
				return fmt.Errorf("%s: %+v, want %+v", table, r, want)
			}
			if table != "usage_hourly_customer" && r.EarningMicros != want.EarningMicros {
				return fmt.Errorf("%s: %+v, want %+v", table, r, want)
			}
		}
		return nil
	})
}

// usageConsumerInfo reads settlement's consumer on USAGE.
func (g *grid) usageConsumerInfo() *jetstream.ConsumerInfo {
	g.t.Helper()
	c, err := g.conn.JS.Consumer(context.Background(), subjects.StreamUsage, g.cfg.Consumer)
	if err != nil {
		g.t.Fatal(err)
	}
	return c.CachedInfo()
}

// deadLetters reads the first n letters of stream DEADLETTER, checking that
// each is on its reason's subject.
func (g *grid) deadLetters(n int) []wire.DeadLetter {
	g.t.Helper()
	dl, err := g.conn.JS.OrderedConsumer(context.Background(), subjects.StreamDeadLetter, jetstream.OrderedConsumerConfig{})
	if err != nil {
		g.t.Fatal(err)
	}
	var out []wire.DeadLetter
	for range n {
		m, err := dl.Next(jetstream.FetchMaxWait(10 * time.Second))
		if err != nil {
			g.t.Fatalf("dead letter %d of %d: %v", len(out)+1, n, err)
		}
		var d wire.DeadLetter
		if err := wire.Decode(m.Data(), &d); err != nil {
			g.t.Fatal(err)
		}
		if m.Subject() != subjects.DeadLetter(d.Service, d.Reason) {
			g.t.Fatalf("dead letter %+v on %s", d, m.Subject())
		}
		out = append(out, d)
	}
	return out
}
