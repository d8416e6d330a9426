package bus_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/subjects"
)

// TestConnectInboxPrefix checks that replies, JetStream acknowledgements
// included, arrive under the configured inbox prefix.
func TestConnectInboxPrefix(t *testing.T) {
	s := bustest.Server(t)
	prefix := subjects.NodeInbox("n1")
	c, err := bus.Connect(context.Background(), config.NATS{URL: s.ClientURL(), InboxPrefix: prefix}, nil, "inbox-test")
	if err != nil {
		t.Fatal(err)
	}
	defer c.NC.Close()
	if in := c.NC.NewInbox(); !strings.HasPrefix(in, prefix+".") {
		t.Fatalf("inbox %q does not start with %q", in, prefix+".")
	}
	// Watch what the server sends to the inbox tree while publishing.
	mon := bustest.Connect(t, s, "monitor")
	seen := make(chan string, 16)
	sub, err := mon.NC.Subscribe(prefix+".>", func(m *nats.Msg) { seen <- m.Subject })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := mon.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.JS.Publish(ctx, subjects.UsageNode("n1"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case subj := <-seen:
		if !strings.HasPrefix(subj, prefix+".") {
			t.Fatalf("ack went to %q", subj)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no acknowledgement seen under the inbox prefix")
	}
}

func TestConnectRejectsBadInboxPrefix(t *testing.T) {
	s := bustest.Server(t)
	_, err := bus.Connect(context.Background(), config.NATS{URL: s.ClientURL(), InboxPrefix: "_INBOX.>"}, nil, "bad")
	if err == nil || !strings.Contains(err.Error(), "NATS_INBOX_PREFIX") {
		t.Fatalf("want an error naming NATS_INBOX_PREFIX, got %v", err)
	}
}
