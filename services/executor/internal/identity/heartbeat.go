package identity

import (
	"github.com/tessera-grid/tessera/pkg/nodesig"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// CanonicalHeartbeat is the byte string a heartbeat's signature covers; see
// nodesig.CanonicalHeartbeat.
func CanonicalHeartbeat(hb *wire.Heartbeat) ([]byte, error) {
	return nodesig.CanonicalHeartbeat(hb)
}

// SignHeartbeat signs hb: it sets hb.PublicKey to the identity's key when it
// is empty (and refuses a different one), then sets hb.Signature to the
// standard base64 encoding of the signature over CanonicalHeartbeat(hb).
func (id *Identity) SignHeartbeat(hb *wire.Heartbeat) error {
	return nodesig.SignHeartbeat(hb, id.pub, id.Sign)
}

// VerifyHeartbeat checks hb.Signature against hb.PublicKey over
// CanonicalHeartbeat(hb).
func VerifyHeartbeat(hb *wire.Heartbeat) error {
	return nodesig.VerifyHeartbeat(hb)
}
