package settlement_test

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
	"github.com/tessera-grid/tessera/services/settlement/internal/clickhousetest"
)

// customer is an enterprise customer's own NATS client.
type customer struct {
	t    *testing.T
	id   string
	nc   *nats.Conn
	js   jetstream.JetStream
	errs chan error
}

func connectCustomer(t *testing.T, ns *server.Server, id string) *customer {
	t.Helper()
	c := &customer{t: t, id: id, errs: make(chan error, 64)}
	nc, err := nats.Connect(ns.ClientURL(), nats.UserInfo(id, id+"-secret"),
		nats.CustomInboxPrefix(subjects.CustomerInbox(id)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case c.errs <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	c.nc = nc
	c.js, err = jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// refused runs act and asserts that the server refused it for lack of
// permission on a subject containing subject.
func (c *customer) refused(what, subject string, act func() error) {
	c.t.Helper()
	for len(c.errs) > 0 {
		<-c.errs
	}
	err := act()
	if err != nil && strings.Contains(strings.ToLower(err.Error()), "permissions violation") && strings.Contains(err.Error(), subject) {
		return
	}
	select {
	case perr := <-c.errs:
		if !errors.Is(perr, nats.ErrPermissionViolation) || !strings.Contains(perr.Error(), subject) {
			c.t.Fatalf("%s: %s: got %v (and %v)", c.id, what, perr, err)
		}
	case <-time.After(5 * time.Second):
		c.t.Fatalf("%s: %s was not refused (result: %v)", c.id, what, err)
	}
}

// consumer asks settlement for (a reset of) its consumer.
func (c *customer) consumer(req settlement.ConsumerRequest) settlement.ConsumerReply {
	c.t.Helper()
	b, _ := json.Marshal(req)
	msg, err := c.nc.Request(subjects.SettlementCustomerConsumer(c.id), b, 10*time.Second)
	if err != nil {
		c.t.Fatalf("%s: consumer request: %v", c.id, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		c.t.Fatalf("%s: consumer request: %s %s", c.id, code, msg.Header.Get(micro.ErrorHeader))
	}
	var reply settlement.ConsumerReply
	if err := json.Unmarshal(msg.Data, &reply); err != nil {
		c.t.Fatal(err)
	}
	return reply
}

// drain pulls everything its consumer has, acknowledging each event.
func (c *customer) drain() []wire.CustomerUsage {
	c.t.Helper()
	ctx := context.Background()
	cons, err := c.js.Consumer(ctx, subjects.StreamCustomerUsage, c.id)
	if err != nil {
		c.t.Fatalf("%s: %v", c.id, err)
	}
	var out []wire.CustomerUsage
	for {
		batch, err := cons.Fetch(500, jetstream.FetchMaxWait(300*time.Millisecond))
		if err != nil {
			c.t.Fatal(err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			var u wire.CustomerUsage
			if err := wire.Decode(m.Data(), &u); err != nil {
				c.t.Fatalf("%s: %v", c.id, err)
			}
			if m.Subject() != subjects.CustomerUsage(u.Event.Customer, u.Event.Model) || m.Headers().Get(wire.HdrMsgID) != u.Event.ID {
				c.t.Fatalf("%s: event %s on %s", c.id, u.Event.ID, m.Subject())
			}
			if err := m.Ack(); err != nil {
				c.t.Fatal(err)
			}
			out = append(out, u)
		}
		if err := batch.Error(); err != nil {
			c.t.Fatalf("%s: fetch: %v", c.id, err)
		}
		if n == 0 {
			return out
		}
	}
}

// With real NATS authentication, each customer consumes and replays its own
// usage from a point in time, and is refused everything of another
// customer's: subjects, consumers, inbox, and the stream's messages.
func TestCustomersSeeOnlyTheirOwnUsage(t *testing.T) {
	ch := clickhousetest.Require(t, chServer)
	var users []*server.User
	users = append(users, &server.User{Username: "settlement", Password: "settlement-secret"})
	for _, id := range []string{"acme", "globex"} {
		p, err := settlement.CustomerPermissions(id)
		if err != nil {
			t.Fatal(err)
		}
		users = append(users, &server.User{Username: id, Password: id + "-secret", Permissions: &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: p.Publish},
			Subscribe: &server.SubjectPermission{Allow: p.Subscribe},
		}})
	}
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: filepath.Join(t.TempDir(), "nats"),
		NoSigs: true, NoLog: true, Users: users,
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(ns.Shutdown)
	g := newGridOn(t, ch, ns, config.NATS{URL: ns.ClientURL(), User: "settlement", Password: "settlement-secret"})
	nd := newNode(t, "node-a", "gpu-co", "gpu")
	g.register(nd)

	wave1 := nd.events(t, 0, 300, []string{"acme", "globex"}, []string{"stories260k", "llama-7b"}, t0)
	g.publish(wave1)
	g.start()
	g.waitSettled(300, 30*time.Second)
	cut := time.Now()
	wave2 := nd.events(t, 300, 200, []string{"acme", "globex"}, []string{"stories260k", "llama-7b"}, t0.Add(time.Hour))
	g.publish(wave2)
	g.waitSettled(500, 30*time.Second)

	acme, globex := connectCustomer(t, ns, "acme"), connectCustomer(t, ns, "globex")
	own := func(evs []wire.UsageEvent, id string) map[string]int64 {
		m := map[string]int64{}
		for i := range evs {
			if evs[i].Customer == id {
				m[evs[i].ID] = charge(&evs[i])
			}
		}
		return m
	}
	check := func(c *customer, got []wire.CustomerUsage, want map[string]int64) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s received %d events, want %d", c.id, len(got), len(want))
		}
		for _, u := range got {
			charge, ok := want[u.Event.ID]
			if !ok || u.Event.Customer != c.id || u.ChargeMicros != charge || u.PriceVersion != 4 || u.Seq == 0 {
				t.Fatalf("%s received %+v", c.id, u)
			}
		}
	}
	all := append(append([]wire.UsageEvent{}, wave1...), wave2...)
	for _, c := range []*customer{acme, globex} {
		reply := c.consumer(settlement.ConsumerRequest{})
		if reply.Consumer != c.id || reply.FilterSubject != subjects.CustomerUsageFilter(c.id) || int(reply.Pending) != len(own(all, c.id)) {
			t.Fatalf("%s: consumer %+v", c.id, reply)
		}
		check(c, c.drain(), own(all, c.id))
	}
	// Live: new usage reaches the consumer as it is settled.
	wave3 := nd.events(t, 500, 30, []string{"acme"}, []string{"stories260k"}, t0.Add(2*time.Hour))
	g.publish(wave3)
	g.waitSettled(530, 30*time.Second)
	check(acme, acme.drain(), own(wave3, "acme"))
	// Replay from a point in time: everything settled since cut.
	acme.consumer(settlement.ConsumerRequest{Deliver: "by_start_time", StartTime: &cut})
	check(acme, acme.drain(), own(append(append([]wire.UsageEvent{}, wave2...), wave3...), "acme"))

	// Everything of globex's is refused to acme.
	ctx := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		t.Cleanup(cancel)
		return ctx
	}
	stream := subjects.StreamCustomerUsage
	acme.refused("reset globex's consumer", subjects.SettlementCustomerConsumer("globex"), func() error {
		_, err := acme.nc.Request(subjects.SettlementCustomerConsumer("globex"), []byte(`{"deliver":"all"}`), 300*time.Millisecond)
		return err
	})
	acme.refused("read globex's consumer", "$JS.API.CONSUMER.INFO."+stream+".globex", func() error {
		_, err := acme.js.Consumer(ctx(), stream, "globex")
		return err
	})
	acme.refused("pull from globex's consumer", "$JS.API.CONSUMER.MSG.NEXT."+stream+".globex", func() error {
		_, err := acme.nc.Request("$JS.API.CONSUMER.MSG.NEXT."+stream+".globex", []byte(`{"batch":1,"expires":1000000000}`), 300*time.Millisecond)
		return err
	})
	acme.refused("create a consumer on globex's usage", "$JS.API.CONSUMER.CREATE."+stream, func() error {
		_, err := acme.js.CreateConsumer(ctx(), stream, jetstream.ConsumerConfig{Durable: "acme", FilterSubject: subjects.CustomerUsageFilter("globex")})
		return err
	})
	acme.refused("create a push consumer of its own", "$JS.API.CONSUMER.CREATE."+stream, func() error {
		_, err := acme.js.CreateConsumer(ctx(), stream, jetstream.ConsumerConfig{Durable: "acme-push", FilterSubject: subjects.CustomerUsageFilter("acme"), DeliverSubject: subjects.UsageNode("x")})
		return err
	})
	acme.refused("subscribe to globex's usage", subjects.CustomerUsageFilter("globex"), func() error {
		_, err := acme.nc.SubscribeSync(subjects.CustomerUsageFilter("globex"))
		return err
	})
	acme.refused("subscribe to globex's inbox", subjects.CustomerInbox("globex"), func() error {
		_, err := acme.nc.SubscribeSync(subjects.CustomerInbox("globex") + ".>")
		return err
	})
	acme.refused("read the stream's messages", "$JS.API.STREAM.MSG.GET."+stream, func() error {
		_, err := acme.nc.Request("$JS.API.STREAM.MSG.GET."+stream, []byte(`{"seq":1}`), 300*time.Millisecond)
		return err
	})
	acme.refused("read messages directly", "$JS.API.DIRECT.GET."+stream, func() error {
		_, err := acme.nc.Request("$JS.API.DIRECT.GET."+stream, []byte(`{"seq":1}`), 300*time.Millisecond)
		return err
	})
	acme.refused("acknowledge globex's messages", "$JS.ACK."+stream+".globex", func() error {
		return acme.nc.Publish("$JS.ACK."+stream+".globex.1.1.1.1.0", nil)
	})
	acme.refused("publish usage", subjects.CustomerUsage("acme", "stories260k"), func() error {
		return acme.nc.Publish(subjects.CustomerUsage("acme", "stories260k"), []byte(`{}`))
	})
	// globex's consumer is untouched: still there, with nothing pending.
	info, err := g.conn.JS.Consumer(context.Background(), stream, "globex")
	if err != nil {
		t.Fatal(err)
	}
	if ci := info.CachedInfo(); ci.Config.FilterSubject != subjects.CustomerUsageFilter("globex") || ci.NumPending != 0 || ci.NumAckPending != 0 {
		t.Fatalf("globex's consumer changed: %+v", ci)
	}
	if got := globex.drain(); len(got) != 0 {
		t.Fatalf("globex got %d events that are not new", len(got))
	}
}
