package customers

import (
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

// Permissions name only the customer's own consumer, endpoint and inbox,
// and refuse ids that would widen them.
func TestPermissionsFor(t *testing.T) {
	p, err := PermissionsFor("acme")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range append(append([]string{}, p.Publish...), p.Subscribe...) {
		if !strings.Contains(s, "acme") {
			t.Errorf("%s is not limited to acme", s)
		}
		if strings.Contains(s, "CONSUMER.CREATE") || strings.Contains(s, "DURABLE") {
			t.Errorf("%s lets the customer create consumers", s)
		}
	}
	if len(p.Subscribe) != 1 || p.Subscribe[0] != subjects.CustomerInbox("acme")+".>" {
		t.Errorf("subscribe %v", p.Subscribe)
	}
	for _, bad := range []string{"", "*", ">", "acme.globex", "a b"} {
		if _, err := PermissionsFor(bad); err == nil {
			t.Errorf("customer %q accepted", bad)
		}
	}
}
