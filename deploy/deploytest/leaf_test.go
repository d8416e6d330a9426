package deploytest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/deploy/accounts"
	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/subjects"
)

// TestSupplierLeafNode: a supplier site runs deploy/nats/leaf.conf with the
// leaf credentials of its nodes (n1); its executor connects to the site's
// server without credentials and works with the grid as if connected
// directly (heartbeats, usage, plans, fragments through the grid's
// JetStream domain, answering stage requests), while nothing for another
// node or another customer crosses the leaf connection.
func TestSupplierLeafNode(t *testing.T) {
	g, hub, admin := startSingle(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	leafCreds, err := g.secrets.IssueLeaf("supplier-a", []string{"n1"}, "tessera", 0)
	if err != nil {
		t.Fatal(err)
	}
	port := freePorts(t, 1)[0]
	conf := filepath.Join(g.dir, "site", "leaf.conf")
	proctest.Localise(t, "leaf.conf", conf,
		"server_name: leaf-SUPPLIER", "server_name: leaf-supplier-a",
		"listen: 127.0.0.1:4222", fmt.Sprintf("listen: 127.0.0.1:%d", port),
		`"nats-leaf://nats-1:7422"`, fmt.Sprintf("%q", "nats-leaf://"+hubLeafAddr(t, g)),
		`"nats-leaf://nats-2:7422"`, "",
		`"nats-leaf://nats-3:7422"`, "",
		`"/etc/tessera/leaf-SUPPLIER.creds"`, fmt.Sprintf("%q", leafCreds.Creds))
	leaf := startNATS(t, "leaf-supplier-a", conf, port)
	leaf.waitReady(t)
	checkFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if !strings.Contains(hub.logText(), "Leafnode connection created") {
			return errors.New("leaf node not connected to the grid")
		}
		return nil
	})

	// The site's executor: no credentials, the grid's JetStream domain.
	n1 := connect(t, "n1", config.NATS{URL: leaf.URL, JSDomain: "tessera", InboxPrefix: accounts.InboxPrefix(accounts.RoleExecutor, "n1")})

	t.Run("heartbeats and usage of its own nodes only", func(t *testing.T) {
		sub, err := admin.NC.SubscribeSync(subjects.HeartbeatAll)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		flush(t, admin)
		// Interest crosses the leaf connection asynchronously: beat until seen.
		checkFor(t, 10*time.Second, 20*time.Millisecond, func() error {
			if err := n1.NC.Publish(subjects.Heartbeat("n1"), []byte("first")); err != nil {
				return err
			}
			_, err := sub.NextMsg(20 * time.Millisecond)
			return err
		})
		// A forged heartbeat, then a genuine one on the same connection: the
		// genuine one is the first to arrive.
		for _, hb := range []struct{ node, data string }{{"n3", "forged"}, {"n1", "genuine"}} {
			if err := n1.NC.Publish(subjects.Heartbeat(hb.node), []byte(hb.data)); err != nil {
				t.Fatal(err)
			}
		}
		if m := nextAfter(t, sub, "first"); string(m.Data) != "genuine" {
			t.Fatalf("first heartbeat after the forged one: %q", m.Data)
		}
		if _, err := n1.JS.Publish(ctx, subjects.UsageNode("n1"), []byte(`{"node":"n1"}`)); err != nil {
			t.Fatalf("own usage through the leaf: %v", err)
		}
		short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		if _, err := n1.JS.Publish(short, subjects.UsageNode("n3"), []byte(`forged`)); err == nil {
			t.Fatal("usage of n3 published through supplier-a's leaf")
		}
		st, err := admin.JS.Stream(ctx, subjects.StreamUsage)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.GetLastMsgForSubject(ctx, subjects.UsageNode("n3")); !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Fatalf("stream USAGE holds usage of n3: %v", err)
		}
	})

	t.Run("plans and fragments through the grid's domain", func(t *testing.T) {
		plans, err := admin.JS.KeyValue(ctx, subjects.BucketPlans)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := plans.Put(ctx, "m", []byte(`{"model":"m"}`)); err != nil {
			t.Fatal(err)
		}
		frags, err := admin.JS.ObjectStore(ctx, subjects.ObjectFragments)
		if err != nil {
			t.Fatal(err)
		}
		blob := bytes.Repeat([]byte("w"), 1<<20)
		if _, err := frags.PutBytes(ctx, "sha256/leaf", blob); err != nil {
			t.Fatal(err)
		}
		kv, err := n1.JS.KeyValue(ctx, subjects.BucketPlans)
		if err != nil {
			t.Fatal(err)
		}
		w, err := kv.WatchAll(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Stop()
		for e := range w.Updates() {
			if e != nil && e.Key() == "m" {
				break
			}
		}
		obs, err := n1.JS.ObjectStore(ctx, subjects.ObjectFragments)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := obs.GetBytes(ctx, "sha256/leaf"); err != nil || !bytes.Equal(got, blob) {
			t.Fatalf("fragment through the leaf: %d bytes, %v", len(got), err)
		}
	})

	t.Run("its work arrives and is answered, others' does not", func(t *testing.T) {
		stage, err := n1.NC.Subscribe(subjects.Stage("n1"), func(m *nats.Msg) { _ = m.Respond([]byte("logits")) })
		if err != nil {
			t.Fatal(err)
		}
		defer stage.Unsubscribe()
		leaked, err := n1.NC.SubscribeSync(subjects.CustomerUsageAll)
		if err != nil {
			t.Fatal(err)
		}
		other, err := n1.NC.SubscribeSync(subjects.Stage("n3"))
		if err != nil {
			t.Fatal(err)
		}
		release, err := n1.NC.SubscribeSync(subjects.SessionRelease)
		if err != nil {
			t.Fatal(err)
		}
		flush(t, n1)
		router := connect(t, "router", g.natsConfig(t, hub.URL, accounts.RoleRouter, "router-1"))
		checkFor(t, 10*time.Second, 20*time.Millisecond, func() error {
			reply, err := router.NC.Request(subjects.Stage("n1"), []byte("frame"), 200*time.Millisecond)
			if err != nil {
				return err
			}
			if string(reply.Data) != "logits" {
				return fmt.Errorf("reply %q", reply.Data)
			}
			return nil
		})
		checkFor(t, 10*time.Second, 20*time.Millisecond, func() error {
			if err := router.NC.Publish(subjects.SessionRelease, []byte("warm-up")); err != nil {
				return err
			}
			_, err := release.NextMsg(20 * time.Millisecond)
			return err
		})
		// Customer usage and another node's work, then a release: when the
		// release arrives, neither of the others did.
		if _, err := admin.JS.Publish(ctx, subjects.CustomerUsage("acme", "m"), []byte("private")); err != nil {
			t.Fatal(err)
		}
		if err := router.NC.Publish(subjects.Stage("n3"), []byte("not yours")); err != nil {
			t.Fatal(err)
		}
		if err := router.NC.Publish(subjects.SessionRelease, []byte("last")); err != nil {
			t.Fatal(err)
		}
		if m := nextAfter(t, release, "warm-up"); string(m.Data) != "last" {
			t.Fatalf("release: %q", m.Data)
		}
		for _, s := range []*nats.Subscription{leaked, other} {
			if n, _, _ := s.Pending(); n != 0 {
				t.Fatalf("%s: %d messages crossed the leaf", s.Subject, n)
			}
		}
	})
}

// hubLeafAddr is the leaf node listener of the grid's localised single.conf.
func hubLeafAddr(t *testing.T, g *grid) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(g.confDir, "single.conf"))
	if err != nil {
		t.Fatal(err)
	}
	conf := string(b)
	i := strings.Index(conf, "leafnodes {")
	if i < 0 {
		t.Fatal("single.conf has no leafnodes block")
	}
	var port int
	if _, err := fmt.Sscanf(strings.TrimSpace(conf[i+len("leafnodes {"):]), "listen: 127.0.0.1:%d", &port); err != nil {
		t.Fatalf("leafnodes listen: %v", err)
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

// nextAfter returns the next message on s that is not a warm-up one. The
// warm-ups were published on the same connection before what the caller
// waits for, so any still crossing the leaf arrive ahead of it.
func nextAfter(t *testing.T, s *nats.Subscription, warmUp string) *nats.Msg {
	t.Helper()
	for {
		m, err := s.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("%s: %v", s.Subject, err)
		}
		if string(m.Data) != warmUp {
			return m
		}
	}
}
