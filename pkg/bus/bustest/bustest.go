// Package bustest starts real embedded NATS servers with JetStream for tests
// and provides the polling helper CheckFor.
package bustest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
)

// Server starts an embedded nats-server with JetStream on a free loopback
// port, its store in a temporary directory, and bootstraps the grid's
// streams and buckets. It is shut down when the test ends.
func Server(t testing.TB) *server.Server {
	t.Helper()
	s, err := bus.StartEmbedded(bus.EmbedOptions{StoreDir: t.TempDir(), Port: -1, Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	c := Connect(t, s, "bootstrap")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := bus.Bootstrap(ctx, c.JS, 1); err != nil {
		t.Fatal(err)
	}
	return s
}

// Connect opens a client connection to s named name, closed when the test ends.
func Connect(t testing.TB, s *server.Server, name string) *bus.Conn {
	t.Helper()
	c, err := bus.Connect(context.Background(), config.NATS{URL: s.ClientURL()}, nil, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.NC.Close() })
	return c
}

// CheckFor calls f every interval until it returns nil or timeout passes,
// then fails the test with f's last error.
func CheckFor(t testing.TB, timeout, interval time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = f(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %v: %v", timeout, err)
		}
		time.Sleep(interval)
	}
}
