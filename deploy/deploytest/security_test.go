package deploytest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/deploy/accounts"
	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// startSingle starts deploy/nats/single.conf on free loopback ports with a
// fresh operator and accounts, and bootstraps the grid as the admin, as the
// walkthrough does. It returns the grid, the server and an admin client.
func startSingle(t *testing.T) (*grid, *natsServer, *client) {
	t.Helper()
	g := newGrid(t)
	ports := freePorts(t, 3)
	conf := filepath.Join(g.confDir, "single.conf")
	proctest.Localise(t, "single.conf", conf,
		"listen: 0.0.0.0:4222", fmt.Sprintf("listen: 127.0.0.1:%d", ports[0]),
		"http: 127.0.0.1:8222", fmt.Sprintf("http: 127.0.0.1:%d", ports[1]),
		`store_dir: "/var/lib/nats/jetstream"`, fmt.Sprintf("store_dir: %q", filepath.Join(g.dir, "jetstream")),
		"listen: 0.0.0.0:7422", fmt.Sprintf("listen: 127.0.0.1:%d", ports[2]))
	s := startNATS(t, "nats-1", conf, ports[0])
	s.waitReady(t)
	adminCreds := g.issue(t, accounts.RoleAdmin, "ops")
	t.Setenv("NATS_URL", s.URL)
	t.Setenv("NATS_CREDS", adminCreds)
	t.Setenv("NATS_REPLICAS", "1")
	tool(t, "bootstrap")
	admin := connect(t, "admin", g.natsConfig(t, s.URL, accounts.RoleAdmin, "ops"))
	return g, s, admin
}

// TestExecutorPermissions: an executor's credentials let it heartbeat, publish
// usage, answer its own work and read plans, models and fragments, and
// nothing of any other node's or customer's.
func TestExecutorPermissions(t *testing.T) {
	g, s, admin := startSingle(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n1 := connect(t, "n1", g.natsConfig(t, s.URL, accounts.RoleExecutor, "n1"))
	n2 := connect(t, "n2", g.natsConfig(t, s.URL, accounts.RoleExecutor, "n2"))

	t.Run("own heartbeat and usage", func(t *testing.T) {
		sub, err := admin.NC.SubscribeSync(subjects.HeartbeatAll)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		flush(t, admin)
		if err := n1.NC.Publish(subjects.Heartbeat("n1"), []byte(`{"node":"n1"}`)); err != nil {
			t.Fatal(err)
		}
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil || m.Subject != subjects.Heartbeat("n1") {
			t.Fatalf("heartbeat not delivered: %v %v", m, err)
		}
		if _, err := n1.JS.Publish(ctx, subjects.UsageNode("n1"), []byte(`{"node":"n1"}`)); err != nil {
			t.Fatalf("own usage: %v", err)
		}
		n1.noViolations(t)
	})

	t.Run("another node's heartbeat is refused", func(t *testing.T) {
		sub, err := admin.NC.SubscribeSync(subjects.Heartbeat("n2"))
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		flush(t, admin)
		if err := n1.NC.Publish(subjects.Heartbeat("n2"), []byte(`forged`)); err != nil {
			t.Fatal(err)
		}
		flush(t, n1)
		n1.violation(t, "Publish", subjects.Heartbeat("n2"))
		// n2's own heartbeat, published after the forged one was refused,
		// is the first to arrive: the forged one never did.
		if err := n2.NC.Publish(subjects.Heartbeat("n2"), []byte(`genuine`)); err != nil {
			t.Fatal(err)
		}
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil || string(m.Data) != "genuine" {
			t.Fatalf("first heartbeat of n2 seen: %v %v", m, err)
		}
	})

	t.Run("another node's usage is refused", func(t *testing.T) {
		pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		_, err := n1.JS.Publish(pctx, subjects.UsageNode("n2"), []byte(`forged`))
		cancel()
		if err == nil {
			t.Fatal("usage for n2 published with n1's credentials")
		}
		n1.violation(t, "Publish", subjects.UsageNode("n2"))
		st, err := admin.JS.Stream(ctx, subjects.StreamUsage)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.GetLastMsgForSubject(ctx, subjects.UsageNode("n2")); !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Fatalf("stream USAGE holds a message for n2: %v", err)
		}
	})

	t.Run("another node's work cannot be read or sent", func(t *testing.T) {
		for _, subj := range []string{
			subjects.Stage("n2"), subjects.Control("n2"), subjects.Challenge("n2"),
			subjects.Stage("*"), subjects.NodeAll, subjects.HeartbeatAll,
			subjects.NodeInbox("n2") + ".>", "_INBOX.>", subjects.ServiceInbox("router") + ".>",
		} {
			if _, err := n1.NC.SubscribeSync(subj); err != nil {
				t.Fatal(err)
			}
			n1.violation(t, "Subscription", subj)
		}
		// Work sent to n2 reaches n2, never n1.
		got, err := n2.NC.SubscribeSync(subjects.Stage("n2"))
		if err != nil {
			t.Fatal(err)
		}
		flush(t, n2)
		for _, subj := range []string{subjects.Stage("n2"), subjects.Control("n2")} {
			if err := n1.NC.Publish(subj, []byte("forged")); err != nil {
				t.Fatal(err)
			}
			flush(t, n1)
			n1.violation(t, "Publish", subj)
		}
		if err := admin.NC.Publish(subjects.Stage("n2"), []byte("work")); err != nil {
			t.Fatal(err)
		}
		if m, err := got.NextMsg(5 * time.Second); err != nil || string(m.Data) != "work" {
			t.Fatalf("n2's first stage message: %v %v", m, err)
		}
	})

	t.Run("customers' usage and grid state cannot be read or written", func(t *testing.T) {
		for _, subj := range []string{subjects.CustomerUsageAll, subjects.CustomerUsageFilter("acme"), subjects.UsageAll, subjects.MembershipAll} {
			if _, err := n1.NC.SubscribeSync(subj); err != nil {
				t.Fatal(err)
			}
			n1.violation(t, "Subscription", subj)
		}
		denied := []string{
			"$JS.API.STREAM.INFO." + subjects.StreamCustomerUsage,
			"$JS.API.CONSUMER.CREATE." + subjects.StreamCustomerUsage + ".x." + subjects.CustomerUsageFilter("acme"),
			"$JS.API.DIRECT.GET." + subjects.StreamCustomerUsage + "." + subjects.CustomerUsage("acme", "m"),
			"$JS.API.STREAM.MSG.GET." + subjects.StreamUsage,
			"$JS.API.STREAM.INFO.KV_" + subjects.BucketAPIKeys,
			"$JS.API.STREAM.DELETE." + subjects.StreamUsage,
			"$JS.API.STREAM.UPDATE.KV_" + subjects.BucketPlans,
			"$KV." + subjects.BucketPlans + ".m",
			"$KV." + subjects.BucketNodes + ".n1",
			subjects.Membership("n1", wire.MemberJoined),
			subjects.PlanEvent("m"),
			subjects.CustomerUsage("acme", "m"),
		}
		for _, subj := range denied {
			if err := n1.NC.PublishRequest(subj, n1.NC.NewInbox(), []byte(`{}`)); err != nil {
				t.Fatal(err)
			}
			flush(t, n1)
			n1.violation(t, "Publish", subj)
		}
	})

	t.Run("plans, models and fragments can be read", func(t *testing.T) {
		// The admin stands for the planner and the model import.
		plans, err := admin.JS.KeyValue(ctx, subjects.BucketPlans)
		if err != nil {
			t.Fatal(err)
		}
		models, err := admin.JS.KeyValue(ctx, subjects.BucketModels)
		if err != nil {
			t.Fatal(err)
		}
		frags, err := admin.JS.ObjectStore(ctx, subjects.ObjectFragments)
		if err != nil {
			t.Fatal(err)
		}
		blob := bytes.Repeat([]byte("fragment"), 300_000) // several chunks
		if _, err := frags.PutBytes(ctx, "sha256/abc", blob); err != nil {
			t.Fatal(err)
		}
		if _, err := models.Put(ctx, "m", []byte(`{"id":"m"}`)); err != nil {
			t.Fatal(err)
		}
		c := connect(t, "n3", g.natsConfig(t, s.URL, accounts.RoleExecutor, "n3"))
		pkv, err := c.JS.KeyValue(ctx, subjects.BucketPlans)
		if err != nil {
			t.Fatal(err)
		}
		w, err := pkv.WatchAll(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := plans.Put(ctx, "m", []byte(`{"model":"m"}`)); err != nil {
			t.Fatal(err)
		}
		for e := range w.Updates() {
			if e != nil && e.Key() == "m" {
				break
			}
		}
		if err := w.Stop(); err != nil {
			t.Fatal(err)
		}
		mkv, err := c.JS.KeyValue(ctx, subjects.BucketModels)
		if err != nil {
			t.Fatal(err)
		}
		if e, err := mkv.Get(ctx, "m"); err != nil || string(e.Value()) != `{"id":"m"}` {
			t.Fatalf("model: %v %v", e, err)
		}
		mw, err := mkv.WatchAll(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e := <-mw.Updates(); e == nil || e.Key() != "m" {
			t.Fatalf("model watch: %v", e)
		}
		if err := mw.Stop(); err != nil {
			t.Fatal(err)
		}
		obs, err := c.JS.ObjectStore(ctx, subjects.ObjectFragments)
		if err != nil {
			t.Fatal(err)
		}
		got, err := obs.GetBytes(ctx, "sha256/abc")
		if err != nil || !bytes.Equal(got, blob) {
			t.Fatalf("fragment: %d bytes, %v", len(got), err)
		}
		c.noViolations(t)
	})

	t.Run("requests to the node are answered, once", func(t *testing.T) {
		sub, err := n1.NC.Subscribe(subjects.Stage("n1"), func(m *nats.Msg) {
			_ = m.Respond([]byte("logits"))
			_ = m.Respond([]byte("again"))
		})
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		flush(t, n1)
		router := connect(t, "router", g.natsConfig(t, s.URL, accounts.RoleRouter, "router-1"))
		reply, err := router.NC.Request(subjects.Stage("n1"), []byte("frame"), 5*time.Second)
		if err != nil || string(reply.Data) != "logits" {
			t.Fatalf("stage reply: %v %v", reply, err)
		}
		// The second reply to one request is refused (allow_responses: one).
		checkFor(t, 5*time.Second, 5*time.Millisecond, func() error {
			n1.mu.Lock()
			defer n1.mu.Unlock()
			for _, e := range n1.errs {
				if bytes.Contains([]byte(e), []byte("Permissions Violation for Publish to \""+subjects.ServiceInbox("router"))) {
					return nil
				}
			}
			return fmt.Errorf("second reply not refused: %q", n1.errs)
		})
	})
}

// TestCustomerPermissions: a customer reads its own usage through its
// durable consumer and nothing of another customer's: not by subscribing,
// not through B's consumer, not with a consumer of its own on B's subjects,
// not by getting stream messages directly.
func TestCustomerPermissions(t *testing.T) {
	g, s, admin := startSingle(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Settlement's part, played by the admin: usage events and one durable
	// consumer per customer, named after it and filtered to its subjects.
	for _, cust := range []string{"acme", "globex"} {
		for i := range 3 {
			b, _ := json.Marshal(map[string]any{"customer": cust, "seq": i})
			if _, err := admin.JS.Publish(ctx, subjects.CustomerUsage(cust, "stories260k"), b); err != nil {
				t.Fatal(err)
			}
		}
		_, err := admin.JS.CreateConsumer(ctx, subjects.StreamCustomerUsage, jetstream.ConsumerConfig{
			Durable: cust, FilterSubject: subjects.CustomerUsageFilter(cust), AckPolicy: jetstream.AckExplicitPolicy,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	acme := connect(t, "acme", g.natsConfig(t, s.URL, accounts.RoleCustomer, "acme"))

	t.Run("own usage through its consumer", func(t *testing.T) {
		cons, err := acme.JS.Consumer(ctx, subjects.StreamCustomerUsage, "acme")
		if err != nil {
			t.Fatal(err)
		}
		batch, err := cons.Fetch(3, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for m := range batch.Messages() {
			var ev map[string]any
			if err := json.Unmarshal(m.Data(), &ev); err != nil || ev["customer"] != "acme" {
				t.Fatalf("event %s: %v", m.Data(), err)
			}
			if err := m.DoubleAck(ctx); err != nil {
				t.Fatalf("ack: %v", err)
			}
			n++
		}
		if n != 3 || batch.Error() != nil {
			t.Fatalf("got %d events, %v", n, batch.Error())
		}
		acme.noViolations(t)
	})

	t.Run("another customer's usage is refused", func(t *testing.T) {
		for _, subj := range []string{subjects.CustomerUsageFilter("globex"), subjects.CustomerUsageAll, subjects.CustomerUsageFilter("acme"), "_INBOX.>", subjects.CustomerInbox("globex") + ".>"} {
			if _, err := acme.NC.SubscribeSync(subj); err != nil {
				t.Fatal(err)
			}
			acme.violation(t, "Subscription", subj)
		}
		cons := subjects.StreamCustomerUsage + ".globex"
		for _, subj := range []string{
			"$JS.API.CONSUMER.INFO." + cons,
			"$JS.API.CONSUMER.MSG.NEXT." + cons,
			"$JS.API.CONSUMER.DELETE." + cons,
			"$JS.API.CONSUMER.CREATE." + subjects.StreamCustomerUsage + ".acme2." + subjects.CustomerUsageFilter("globex"),
			// Not even on its own subjects: a consumer's config may push
			// deliveries anywhere, so settlement creates consumers.
			"$JS.API.CONSUMER.CREATE." + subjects.StreamCustomerUsage + ".acme2." + subjects.CustomerUsageFilter("acme"),
			"$JS.API.CONSUMER.DURABLE.CREATE." + subjects.StreamCustomerUsage + ".acme2",
			"$JS.API.DIRECT.GET." + subjects.StreamCustomerUsage + "." + subjects.CustomerUsage("globex", "stories260k"),
			"$JS.API.DIRECT.GET." + subjects.StreamCustomerUsage,
			"$JS.API.STREAM.MSG.GET." + subjects.StreamCustomerUsage,
			"$JS.API.STREAM.INFO." + subjects.StreamCustomerUsage,
			"$JS.ACK." + cons + ".1.1.1.1.0",
			subjects.SettlementCustomerConsumer("globex"),
		} {
			if err := acme.NC.PublishRequest(subj, acme.NC.NewInbox(), []byte(`{"seq":1}`)); err != nil {
				t.Fatal(err)
			}
			flush(t, acme)
			acme.violation(t, "Publish", subj)
		}
		// Through the JetStream API the same requests fail.
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		if _, err := acme.JS.Consumer(short, subjects.StreamCustomerUsage, "globex"); err == nil {
			t.Fatal("acme reached globex's consumer")
		}
		// globex's events are all still pending for globex.
		info, err := admin.JS.Consumer(ctx, subjects.StreamCustomerUsage, "globex")
		if err != nil {
			t.Fatal(err)
		}
		if p := info.CachedInfo().NumPending; p != 3 {
			t.Fatalf("globex has %d pending events, want 3", p)
		}
	})

	t.Run("executors cannot read customers' usage", func(t *testing.T) {
		n1 := connect(t, "n1", g.natsConfig(t, s.URL, accounts.RoleExecutor, "n1"))
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		if _, err := n1.JS.Consumer(short, subjects.StreamCustomerUsage, "acme"); err == nil {
			t.Fatal("executor reached acme's consumer")
		}
		n1.violation(t, "Publish", "$JS.API.CONSUMER.INFO."+subjects.StreamCustomerUsage+".acme")
	})
}

func flush(t testing.TB, c *client) {
	t.Helper()
	if err := c.NC.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestRevokedExecutorIsRefused follows the walkthrough's revocation: revoke
// the node's key, render accounts.conf again and reload the server; the
// node's credentials are refused from then on.
func TestRevokedExecutorIsRefused(t *testing.T) {
	g, s, _ := startSingle(t)
	out, err := g.secrets.Issue(accounts.Identity{Role: accounts.RoleExecutor, Name: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.NATS{URL: s.URL, Creds: out.Creds, InboxPrefix: accounts.InboxPrefix(accounts.RoleExecutor, "n1")}
	connect(t, "n1", cfg)
	tool(t, "-dir", g.secrets.Dir(), "revoke", "-pubkey", out.PublicKey)
	tool(t, "-dir", g.secrets.Dir(), "server-config", "-o", filepath.Join(g.confDir, "accounts.conf"))
	if err := s.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	checkFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		c, err := bus.Connect(context.Background(), cfg, nil, "n1-again")
		if err == nil {
			c.NC.Close()
			return errors.New("revoked credentials still accepted")
		}
		return nil
	})
	// Other nodes are unaffected.
	connect(t, "n2", g.natsConfig(t, s.URL, accounts.RoleExecutor, "n2"))
}
