package deploytest

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/tessera-grid/tessera/deploy/accounts"
	"github.com/tessera-grid/tessera/pkg/subjects"
)

// TestSettlementPermissions does, with settlement's credentials, each kind of
// JetStream and NATS operation settlement's work consists of (its process
// needs ClickHouse, so this test makes the calls itself): a durable consumer
// on USAGE read from a sequence and acknowledged, verified events
// republished per customer, each customer's consumer (re)created on the
// customer's request, node and price watches, and its micro endpoints. The
// server refuses none of them, and a customer gets its consumer through
// settlement's endpoint and reads from it.
func TestSettlementPermissions(t *testing.T) {
	g, s, admin := startSingle(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	node := connect(t, "n1", g.natsConfig(t, s.URL, accounts.RoleExecutor, "n1"))
	for range 3 {
		if _, err := node.JS.Publish(ctx, subjects.UsageNode("n1"), []byte(`{"customer":"acme"}`)); err != nil {
			t.Fatal(err)
		}
	}
	set := connect(t, "settlement", g.natsConfig(t, s.URL, accounts.RoleSettlement, "settlement-1"))

	// Delivery from a ledger position: replace the durable consumer.
	if _, err := set.JS.Stream(ctx, subjects.StreamUsage); err != nil {
		t.Fatal(err)
	}
	if err := set.JS.DeleteConsumer(ctx, subjects.StreamUsage, "settlement"); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		t.Fatal(err)
	}
	cons, err := set.JS.CreateConsumer(ctx, subjects.StreamUsage, jetstream.ConsumerConfig{
		Durable: "settlement", AckPolicy: jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(2, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	for m := range batch.Messages() {
		// Republish the verified event for its customer, then acknowledge.
		if _, err := set.JS.PublishAsync(subjects.CustomerUsage("acme", "stories260k"), m.Data()); err != nil {
			t.Fatal(err)
		}
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
		got++
	}
	if got != 2 || batch.Error() != nil {
		t.Fatalf("fetched %d events from sequence 2, want 2 (%v)", got, batch.Error())
	}
	select {
	case <-set.JS.PublishAsyncComplete():
	case <-ctx.Done():
		t.Fatal("customer usage not acknowledged")
	}

	// Watches of node records and the price book.
	for _, bucket := range []string{subjects.BucketNodes, subjects.BucketPrices} {
		kv, err := set.JS.KeyValue(ctx, bucket)
		if err != nil {
			t.Fatal(err)
		}
		w, err := kv.WatchAll(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e := <-w.Updates(); e != nil {
			t.Fatalf("bucket %s: unexpected entry %s", bucket, e.Key())
		}
		if err := w.Stop(); err != nil {
			t.Fatal(err)
		}
	}

	// A customer asks settlement for its consumer (settlement's endpoint,
	// whose subject names the customer), then reads its usage.
	svc, err := micro.AddService(set.NC, micro.Config{Name: "settlement", Version: "0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Stop()
	err = svc.AddEndpoint("customer_consumer", micro.HandlerFunc(func(r micro.Request) {
		customer := strings.TrimPrefix(r.Subject(), subjects.SettlementCustomerConsumer(""))
		name := customer
		err := set.JS.DeleteConsumer(ctx, subjects.StreamCustomerUsage, name)
		if err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			_ = r.Error("500", err.Error(), nil)
			return
		}
		_, err = set.JS.CreateConsumer(ctx, subjects.StreamCustomerUsage, jetstream.ConsumerConfig{
			Durable: name, FilterSubject: subjects.CustomerUsageFilter(customer), AckPolicy: jetstream.AckExplicitPolicy,
		})
		if err != nil {
			_ = r.Error("500", err.Error(), nil)
			return
		}
		_ = r.RespondJSON(map[string]string{"stream": subjects.StreamCustomerUsage, "consumer": name})
	}), micro.WithEndpointSubject(subjects.SettlementCustomerConsumerAll))
	if err != nil {
		t.Fatal(err)
	}
	acme := connect(t, "acme", g.natsConfig(t, s.URL, accounts.RoleCustomer, "acme"))
	reply, err := acme.NC.Request(subjects.SettlementCustomerConsumer("acme"), nil, 10*time.Second)
	if err != nil || reply.Header.Get(micro.ErrorHeader) != "" {
		t.Fatalf("consumer request: %v %v", reply, err)
	}
	var where struct{ Stream, Consumer string }
	if err := json.Unmarshal(reply.Data, &where); err != nil {
		t.Fatal(err)
	}
	mine, err := acme.JS.Consumer(ctx, where.Stream, where.Consumer)
	if err != nil {
		t.Fatal(err)
	}
	batch, err = mine.Fetch(2, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	got = 0
	for m := range batch.Messages() {
		if err := m.Ack(); err != nil {
			t.Fatal(err)
		}
		got++
	}
	if got != 2 {
		t.Fatalf("acme read %d events, want 2", got)
	}
	// Discovery of the service works with settlement's credentials too.
	if _, err := admin.NC.Request("$SRV.PING.settlement", nil, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	acme.noViolations(t)
	set.noViolations(t)
	node.noViolations(t)
	// Settlement still may not publish what only executors may.
	if err := set.NC.Publish(subjects.UsageNode("n1"), []byte("forged")); err != nil {
		t.Fatal(err)
	}
	flush(t, set)
	set.violation(t, "Publish", subjects.UsageNode("n1"))
}
