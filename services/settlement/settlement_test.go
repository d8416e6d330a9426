package settlement_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
)

var t0 = time.Now().UTC().Truncate(time.Hour).Add(-3 * time.Hour)

// Every published event lands in ClickHouse once, also when settlement
// stops mid-stream and starts again.
func TestSettlesEveryEventOnceAcrossRestarts(t *testing.T) {
	g := newGrid(t, nil)
	a, b := newNode(t, "node-a", "gpu-co", "gpu"), newNode(t, "node-b", "cpu-co", "cpu")
	g.register(a)
	g.register(b)
	var want totals
	first := append(a.events(t, 0, 700, []string{"acme", "globex"}, []string{"stories260k"}, t0),
		b.events(t, 0, 300, []string{"acme"}, []string{"stories260k", "llama-7b"}, t0.Add(time.Hour))...)
	want.add(first...)
	g.publish(first)
	g.start()
	g.waitSettled(want.Events, 30*time.Second)
	g.stop()

	// Published while settlement is down, then a restart: only the new ones.
	more := a.events(t, 700, 1200, []string{"initech"}, []string{"stories260k"}, t0.Add(2*time.Hour))
	want.add(more...)
	g.publish(more)
	g.start()
	g.waitSettled(want.Events, 30*time.Second)
	// Stop in the middle of the next flow.
	last := b.events(t, 300, 3000, []string{"acme"}, []string{"llama-7b"}, t0.Add(2*time.Hour))
	want.add(last...)
	g.publish(last[:1500])
	g.stop()
	g.publish(last[1500:])
	g.start()
	g.waitSettled(want.Events, 30*time.Second)
	g.checkLedger(want)
	// Everything is acknowledged: nothing waits for redelivery.
	checkFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		info := g.usageConsumerInfo()
		if info.NumAckPending != 0 || info.NumPending != 0 {
			return fmt.Errorf("consumer: %d ack pending, %d pending", info.NumAckPending, info.NumPending)
		}
		return nil
	})
}

// republished returns the raw message with the given subject and data, as a
// forger would publish it.
func raw(t *testing.T, ev wire.UsageEvent, mutate func(*wire.UsageEvent)) *nats.Msg {
	t.Helper()
	if mutate != nil {
		mutate(&ev)
	}
	m, err := usagesig.Message(&ev)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Forged, altered and malformed events go to the dead-letter stream with
// their reason and are never settled; the good events around them are.
func TestBadEventsAreDeadLetteredNotSettled(t *testing.T) {
	g := newGrid(t, nil)
	honest := newNode(t, "node-h", "gpu-co", "gpu")
	forger := newNode(t, "node-f", "evil-co", "gpu")
	g.register(honest)
	g.register(forger)
	good := honest.events(t, 0, 10, []string{"acme"}, []string{"stories260k"}, t0)
	victim := good[3]

	// A batch the forger signs with its own key but attributes to the honest node.
	stolen := forger.events(t, 100, 2, []string{"acme"}, []string{"stories260k"}, t0)
	for i := range stolen {
		stolen[i].Node, stolen[i].Supplier = honest.id, "evil-co"
	}
	if err := forger.signer.SignBatch(stolen); err != nil {
		t.Fatal(err)
	}
	// A batch whose signature is forged: the honest node's public key, the
	// forger's signature.
	posing := honest.events(t, 200, 2, []string{"acme"}, []string{"stories260k"}, t0)
	posing[0].GeneratedTokens = 99999
	fake := forger.events(t, 200, 2, []string{"acme"}, []string{"stories260k"}, t0)
	fake[0].GeneratedTokens = 99999
	if err := forger.signer.SignBatch(fake); err != nil {
		t.Fatal(err)
	}
	posing[0].Node, posing[0].PublicKey, posing[0].Batch = honest.id, honest.signer.PublicKey(), fake[0].Batch
	ghost := newNode(t, "node-ghost", "x", "gpu").events(t, 0, 1, []string{"acme"}, []string{"stories260k"}, t0)[0]

	cases := []struct {
		reason string
		msg    *nats.Msg
	}{
		{settlement.ReasonBadSignature, raw(t, victim, func(e *wire.UsageEvent) { e.ID += "-x10"; e.GeneratedTokens *= 10 })},
		{settlement.ReasonBadSignature, raw(t, victim, func(e *wire.UsageEvent) { e.ID += "-again"; e.Customer = "globex" })},
		{settlement.ReasonBadSignature, raw(t, posing[0], nil)},
		{settlement.ReasonKeyMismatch, raw(t, stolen[0], nil)},
		{settlement.ReasonUnknownNode, raw(t, ghost, nil)},
		{settlement.ReasonWrongSubject, func() *nats.Msg {
			m := raw(t, good[5], func(e *wire.UsageEvent) { e.ID += "-moved" })
			m.Subject = subjects.UsageNode(forger.id)
			return m
		}()},
		{settlement.ReasonMalformed, &nats.Msg{Subject: subjects.UsageNode(honest.id), Data: []byte(`{"id":"x"`)}},
		{settlement.ReasonMalformed, &nats.Msg{Subject: subjects.UsageNode(honest.id), Data: []byte(`{"id":"x","surprise":1}`)}},
		{settlement.ReasonMalformed, raw(t, victim, func(e *wire.UsageEvent) { e.ID += "-neg"; e.PromptTokens = -100 })},
		{settlement.ReasonMalformed, raw(t, victim, func(e *wire.UsageEvent) { e.ID += "-root"; e.Batch.Root = "%%%" })},
		{settlement.ReasonMalformed, func() *nats.Msg {
			m := raw(t, good[6], nil)
			m.Header.Set(wire.HdrMsgID, "another-id")
			return m
		}()},
	}
	var want totals
	want.add(good...)
	g.publish(good[:5])
	ctx := context.Background()
	for _, tc := range cases {
		if _, err := g.conn.JS.PublishMsg(ctx, tc.msg); err != nil {
			t.Fatal(err)
		}
	}
	g.publish(good[5:])
	g.start()
	g.waitSettled(want.Events, 30*time.Second)
	g.checkLedger(want)

	// One dead letter per bad event, each with its reason and the original.
	got := map[string]int{}
	wantReasons := map[string]int{}
	for _, tc := range cases {
		wantReasons[tc.reason]++
	}
	for _, d := range g.deadLetters(len(cases)) {
		if d.Service != "settlement" || d.Error == "" || len(d.Data) == 0 || d.StreamSeq == 0 {
			t.Fatalf("dead letter %+v", d)
		}
		got[d.Reason]++
	}
	if fmt.Sprint(got) != fmt.Sprint(wantReasons) {
		t.Fatalf("dead letters by reason %v, want %v", got, wantReasons)
	}
	// The metric counts them by reason too.
	resp, err := g.conn.NC.Request("$SRV.STATS.settlement", nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var stats struct {
		Endpoints []struct {
			Name string             `json:"name"`
			Data settlement.Metrics `json:"data"`
		} `json:"endpoints"`
	}
	if err := json.Unmarshal(resp.Data, &stats); err != nil {
		t.Fatal(err)
	}
	if len(stats.Endpoints) == 0 || fmt.Sprint(stats.Endpoints[0].Data.DeadLettered) != fmt.Sprint(wantReasons) {
		t.Fatalf("metrics: %s", resp.Data)
	}
	if !strings.Contains(string(resp.Data), `"settled_events":10`) {
		t.Fatalf("metrics do not count 10 settled events: %s", resp.Data)
	}
}

// A node's key stays known after its record leaves KV nodes: learned while
// settlement runs, and kept in the ledger across restarts.
func TestNodeKeysOutliveRegistryRecords(t *testing.T) {
	g := newGrid(t, nil)
	early, late := newNode(t, "node-early", "gpu-co", "gpu"), newNode(t, "node-late", "gpu-co", "gpu")
	g.register(early)
	var want totals
	evs := early.events(t, 0, 20, []string{"acme"}, []string{"stories260k"}, t0)
	want.add(evs...)
	g.publish(evs)
	g.start()
	g.waitSettled(want.Events, 30*time.Second)

	// node-late joins and leaves while settlement runs; its events arrive after.
	g.register(late)
	checkFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		keys, err := g.ledger.NodeKeys(context.Background())
		if err != nil {
			return err
		}
		if len(keys[late.id]) != 1 || keys[late.id][0] != late.signer.PublicKey() {
			return fmt.Errorf("keys %v", keys)
		}
		return nil
	})
	kv, err := g.conn.JS.KeyValue(context.Background(), subjects.BucketNodes)
	if err != nil {
		t.Fatal(err)
	}
	for _, nd := range []node{early, late} {
		if err := kv.Delete(context.Background(), nd.id); err != nil {
			t.Fatal(err)
		}
	}
	evs = late.events(t, 0, 20, []string{"acme"}, []string{"stories260k"}, t0)
	want.add(evs...)
	g.publish(evs)
	g.waitSettled(want.Events, 30*time.Second)

	// After a restart neither record is in KV: the ledger remembers the keys.
	g.stop()
	evs = append(early.events(t, 20, 10, []string{"acme"}, []string{"stories260k"}, t0), late.events(t, 20, 10, []string{"acme"}, []string{"stories260k"}, t0)...)
	want.add(evs...)
	g.publish(evs)
	g.start()
	g.waitSettled(want.Events, 30*time.Second)
	g.checkLedger(want)
}

// Unusable settings and a missing connection are refused before anything
// starts, naming what is wrong.
func TestRunRefusesBadConfig(t *testing.T) {
	g := newGrid(t, nil)
	cases := []struct {
		want  string
		alter func(*settlement.Config)
	}{
		{"batch rows 0", func(c *settlement.Config) { c.BatchRows = 0 }},
		{"consumer name", func(c *settlement.Config) { c.Consumer = "a.b" }},
		{"clickhouse database", func(c *settlement.Config) { c.ClickHouseDatabase = "no-dash" }},
		{"price book", func(c *settlement.Config) { c.PriceFile = "/nonexistent/prices.json" }},
	}
	for _, tc := range cases {
		cfg := g.cfg
		tc.alter(&cfg)
		err := settlement.Run(context.Background(), cfg, settlement.Deps{Bus: g.conn})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v", tc.want, err)
		}
	}
	if err := settlement.Run(context.Background(), g.cfg, settlement.Deps{}); !errors.Is(err, settlement.ErrConfig) {
		t.Errorf("no bus: %v", err)
	}
}
