package nodesig

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/wire"
)

func signed(t *testing.T) (*wire.Heartbeat, nkeys.KeyPair) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	hb := &wire.Heartbeat{Node: "n1", Supplier: "acme", Region: "eu", Seq: 3, Time: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		IntervalMS: 1000, State: wire.NodeReady, Fragments: []string{"m/layer.0"}, KVTokensFree: 10}
	if err := SignHeartbeat(hb, pub, kp.Sign); err != nil {
		t.Fatal(err)
	}
	return hb, kp
}

func TestVerifyHeartbeatMessage(t *testing.T) {
	hb, kp := signed(t)
	pub, _ := kp.PublicKey()
	key, err := ParsePublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	goEncoded, _ := json.Marshal(hb)
	// The same members in another order, as another language may send them.
	var m map[string]any
	_ = json.Unmarshal(goEncoded, &m)
	reordered, _ := json.Marshal(m)
	tampered := strings.Replace(string(goEncoded), `"seq":3`, `"seq":4`, 1)
	tests := []struct {
		name    string
		data    string
		wantErr error
	}{
		{name: "as a Go signer sends it", data: string(goEncoded)},
		{name: "members reordered", data: string(reordered)},
		{name: "sequence changed", data: tampered, wantErr: ErrBadSignature},
		{name: "signature stripped", data: strings.Replace(string(goEncoded), `"signature":"`+hb.Signature+`"`, `"signature":""`, 1), wantErr: ErrUnsigned},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got wire.Heartbeat
			if err := wire.Decode([]byte(tt.data), &got); err != nil {
				t.Fatal(err)
			}
			err := key.VerifyHeartbeat([]byte(tt.data), &got)
			if tt.wantErr == nil && err != nil {
				t.Fatalf("verify: %v", err)
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("verify error = %v, want %v", err, tt.wantErr)
			}
			// Without the message the decoded heartbeat verifies the same way.
			if err2 := VerifyHeartbeat(&got); !errors.Is(err2, tt.wantErr) {
				t.Fatalf("verify without the message = %v, want %v", err2, tt.wantErr)
			}
		})
	}
}

func TestVerifyHeartbeatOtherKey(t *testing.T) {
	hb, _ := signed(t)
	other, _ := nkeys.CreateUser()
	otherPub, _ := other.PublicKey()
	key, err := ParsePublicKey(otherPub)
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(hb)
	if err := key.VerifyHeartbeat(data, hb); !errors.Is(err, ErrKeyMismatch) {
		t.Fatalf("heartbeat naming another key: %v, want ErrKeyMismatch", err)
	}
	// A heartbeat that names the other key but carries our signature.
	hb.PublicKey = otherPub
	if err := key.VerifyHeartbeat(nil, hb); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("heartbeat signed by another key: %v, want ErrBadSignature", err)
	}
	for _, bad := range []string{"", "Unot-a-key", "N" + otherPub[1:]} {
		if _, err := ParsePublicKey(bad); !errors.Is(err, ErrBadPublicKey) {
			t.Errorf("ParsePublicKey(%q) = %v, want ErrBadPublicKey", bad, err)
		}
	}
}
