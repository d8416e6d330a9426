package identity

import (
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// CanonicalHeartbeat is the byte string a heartbeat's signature covers:
// json.Marshal of the heartbeat with Signature set to "" (so the field is
// omitted). Decoding a received heartbeat into wire.Heartbeat and encoding it
// again gives the same bytes, because every field round-trips through Go's
// encoding/json; verifiers in other languages must reproduce this encoding.
func CanonicalHeartbeat(hb *wire.Heartbeat) ([]byte, error) {
	unsigned := *hb
	unsigned.Signature = ""
	data, err := json.Marshal(&unsigned)
	if err != nil {
		return nil, fmt.Errorf("encode heartbeat of node %s: %w", hb.Node, err)
	}
	return data, nil
}

// SignHeartbeat signs hb: it sets hb.PublicKey to the identity's key when it
// is empty (and refuses a different one), then sets hb.Signature to the
// standard base64 encoding of the signature over CanonicalHeartbeat(hb).
func (id *Identity) SignHeartbeat(hb *wire.Heartbeat) error {
	switch hb.PublicKey {
	case "":
		hb.PublicKey = id.pub
	case id.pub:
	default:
		return fmt.Errorf("sign heartbeat of node %s: %w: %s, not %s", hb.Node, ErrKeyMismatch, hb.PublicKey, id.pub)
	}
	data, err := CanonicalHeartbeat(hb)
	if err != nil {
		return fmt.Errorf("sign heartbeat: %w", err)
	}
	sig, err := id.Sign(data)
	if err != nil {
		return fmt.Errorf("sign heartbeat of node %s: %w", hb.Node, err)
	}
	hb.Signature = base64.StdEncoding.EncodeToString(sig)
	return nil
}

// VerifyHeartbeat checks hb.Signature against hb.PublicKey over
// CanonicalHeartbeat(hb).
func VerifyHeartbeat(hb *wire.Heartbeat) error {
	if hb.Signature == "" {
		return fmt.Errorf("verify heartbeat of node %s: %w", hb.Node, ErrUnsigned)
	}
	sig, err := base64.StdEncoding.DecodeString(hb.Signature)
	if err != nil {
		return fmt.Errorf("verify heartbeat of node %s: %w: %w", hb.Node, ErrBadSignature, err)
	}
	data, err := CanonicalHeartbeat(hb)
	if err != nil {
		return fmt.Errorf("verify heartbeat: %w", err)
	}
	if err := Verify(hb.PublicKey, data, sig); err != nil {
		return fmt.Errorf("verify heartbeat of node %s: %w", hb.Node, err)
	}
	return nil
}
