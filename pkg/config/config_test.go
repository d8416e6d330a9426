package config

import (
	"context"
	"strings"
	"testing"
	"time"
)

type sample struct {
	Addr     string        `env:"ADDR, default=127.0.0.1:8080"`
	Interval time.Duration `env:"INTERVAL, default=2s"`
	Count    int           `env:"COUNT, required"`
}

func TestLoadMap(t *testing.T) {
	var s sample
	err := LoadMap(context.Background(), "TESSERA_X_", &s, map[string]string{"TESSERA_X_COUNT": "3", "TESSERA_X_INTERVAL": "5s"})
	if err != nil {
		t.Fatal(err)
	}
	if s.Addr != "127.0.0.1:8080" || s.Interval != 5*time.Second || s.Count != 3 {
		t.Fatalf("got %+v", s)
	}
}

func TestLoadMapErrorNamesVariable(t *testing.T) {
	var s sample
	err := LoadMap(context.Background(), "TESSERA_X_", &s, map[string]string{"TESSERA_X_COUNT": "three"})
	if err == nil || !strings.Contains(err.Error(), "TESSERA_X_COUNT") {
		t.Fatalf("want an error naming COUNT, got %v", err)
	}
	err = LoadMap(context.Background(), "TESSERA_X_", &s, nil)
	if err == nil || !strings.Contains(strings.ToUpper(err.Error()), "COUNT") {
		t.Fatalf("want a missing-required error naming COUNT, got %v", err)
	}
}

func TestNATSDefaults(t *testing.T) {
	var n NATS
	if err := LoadMap(context.Background(), "", &n, map[string]string{"NATS_URL": "nats://a:4222"}); err != nil {
		t.Fatal(err)
	}
	if n.URL != "nats://a:4222" || n.Replicas != 1 || !n.Bootstrap || n.InboxPrefix != "" {
		t.Fatalf("got %+v", n)
	}
	n = NATS{}
	err := LoadMap(context.Background(), "", &n, map[string]string{"NATS_INBOX_PREFIX": "_INBOX_node_a", "NATS_BOOTSTRAP": "false", "NATS_JS_DOMAIN": "grid"})
	if err != nil {
		t.Fatal(err)
	}
	if n.InboxPrefix != "_INBOX_node_a" || n.Bootstrap || n.JSDomain != "grid" {
		t.Fatalf("got %+v", n)
	}
}
