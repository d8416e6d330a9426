package config

import (
	"context"
	"strings"
	"testing"
)

// FuzzLoadNATS: the NATS settings come from environment files that
// operators write; any values load or fail with an error naming a NATS_
// variable.
func FuzzLoadNATS(f *testing.F) {
	f.Add("nats://a:4222,nats://b:4222", "/etc/tessera/x.creds", "3", "false", "_INBOX_node_a", "tessera")
	f.Add("", "", "three", "maybe", "", "")
	f.Add("x", "y", "-1", "1", "_INBOX.>", "")
	f.Add("x", "y", "99999999999999999999", "T", " ", "d")
	f.Fuzz(func(t *testing.T, url, creds, replicas, bootstrap, inbox, domain string) {
		var n NATS
		err := LoadMap(context.Background(), "", &n, map[string]string{
			"NATS_URL": url, "NATS_CREDS": creds, "NATS_REPLICAS": replicas, "NATS_BOOTSTRAP": bootstrap,
			"NATS_INBOX_PREFIX": inbox, "NATS_JS_DOMAIN": domain,
		})
		if err != nil && !strings.Contains(err.Error(), "NATS_") {
			t.Fatalf("error names no variable: %v", err)
		}
	})
}
