// Package nodesig is the signature scheme of node heartbeats: the canonical
// byte string a heartbeat's ed25519 signature covers, signing, and
// verification. Executors sign with their nkey; the registry verifies every
// heartbeat before it believes a word of it.
package nodesig

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/nats-io/nkeys"
	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// CanonicalHeartbeat is the byte string a heartbeat's signature covers:
// json.Marshal of the heartbeat with Signature set to "" (so the field is
// omitted). Decoding a received heartbeat into wire.Heartbeat and encoding it
// again gives the same bytes, because every field round-trips through Go's
// encoding/json; signers in other languages must reproduce this encoding.
func CanonicalHeartbeat(hb *wire.Heartbeat) ([]byte, error) {
	unsigned := *hb
	unsigned.Signature = ""
	data, err := json.Marshal(&unsigned)
	if err != nil {
		return nil, fmt.Errorf("encode heartbeat of node %s: %w", hb.Node, err)
	}
	return data, nil
}

// SignHeartbeat signs hb as the key pub with sign (the key's ed25519
// signing function): it sets hb.PublicKey to pub when it is empty (and
// refuses a different one), then hb.Signature to the standard base64
// encoding of the signature over CanonicalHeartbeat(hb).
func SignHeartbeat(hb *wire.Heartbeat, pub string, sign func([]byte) ([]byte, error)) error {
	switch hb.PublicKey {
	case "":
		hb.PublicKey = pub
	case pub:
	default:
		return fmt.Errorf("sign heartbeat of node %s: %w: %s, not %s", hb.Node, ErrKeyMismatch, hb.PublicKey, pub)
	}
	data, err := CanonicalHeartbeat(hb)
	if err != nil {
		return fmt.Errorf("sign heartbeat: %w", err)
	}
	sig, err := sign(data)
	if err != nil {
		return fmt.Errorf("sign heartbeat of node %s: %w", hb.Node, err)
	}
	hb.Signature = base64.StdEncoding.EncodeToString(sig)
	return nil
}

// PublicKey is a parsed node key: its nkey string and the ed25519 key
// expanded into the tables verification needs, so that a verifier that
// sees the same node often (the registry, every heartbeat) pays for the
// decoding once; verification with an expanded key takes well under half
// the time of crypto/ed25519's.
type PublicKey struct {
	nkey string
	key  *voi.ExpandedPublicKey
}

// stdlib makes verification accept exactly what crypto/ed25519 accepts
// (the signers' library), no more and no less.
var stdlib = &voi.Options{Verify: voi.VerifyOptionsStdLib}

// ParsePublicKey parses a user nkey ("U...").
func ParsePublicKey(nkey string) (PublicKey, error) {
	if !nkeys.IsValidPublicUserKey(nkey) {
		return PublicKey{}, fmt.Errorf("%w: %q", ErrBadPublicKey, nkey)
	}
	raw, err := nkeys.Decode(nkeys.PrefixByteUser, []byte(nkey))
	if err != nil || len(raw) != ed25519.PublicKeySize {
		return PublicKey{}, fmt.Errorf("%w: %q", ErrBadPublicKey, nkey)
	}
	key, err := voi.NewExpandedPublicKey(voi.PublicKey(raw))
	if err != nil {
		return PublicKey{}, fmt.Errorf("%w: %q: %w", ErrBadPublicKey, nkey, err)
	}
	return PublicKey{nkey: nkey, key: key}, nil
}

// String is the key as an nkey.
func (k PublicKey) String() string { return k.nkey }

// Verify checks that sig is the key's signature of data.
func (k PublicKey) Verify(data, sig []byte) error {
	if k.key == nil {
		return fmt.Errorf("verify: %w: empty key", ErrBadPublicKey)
	}
	if len(sig) != ed25519.SignatureSize || !voi.VerifyExpandedWithOptions(k.key, data, sig, stdlib) {
		return fmt.Errorf("verify signature by %s: %w", k.nkey, ErrBadSignature)
	}
	return nil
}

// Verify checks that sig is pub's ed25519 signature of data; pub must be a
// user nkey.
func Verify(pub string, data, sig []byte) error {
	k, err := ParsePublicKey(pub)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	return k.Verify(data, sig)
}

// VerifyHeartbeat checks hb.Signature against hb.PublicKey over
// CanonicalHeartbeat(hb).
func VerifyHeartbeat(hb *wire.Heartbeat) error {
	k, err := ParsePublicKey(hb.PublicKey)
	if err != nil {
		return fmt.Errorf("verify heartbeat of node %s: %w", hb.Node, err)
	}
	return k.VerifyHeartbeat(nil, hb)
}

// VerifyHeartbeat checks that hb is signed by k. data, when not nil, is the
// message hb was decoded from: when it is the canonical encoding followed by
// the signature (as every Go signer sends it), its bytes are verified as
// they are, which saves encoding hb again; otherwise hb is re-encoded.
// Either way the signature covers exactly what hb holds.
func (k PublicKey) VerifyHeartbeat(data []byte, hb *wire.Heartbeat) error {
	if hb.PublicKey != k.nkey {
		return fmt.Errorf("verify heartbeat of node %s: %w: %s, not %s", hb.Node, ErrKeyMismatch, hb.PublicKey, k.nkey)
	}
	if hb.Signature == "" {
		return fmt.Errorf("verify heartbeat of node %s: %w", hb.Node, ErrUnsigned)
	}
	sig, err := base64.StdEncoding.DecodeString(hb.Signature)
	if err != nil {
		return fmt.Errorf("verify heartbeat of node %s: %w: %w", hb.Node, ErrBadSignature, err)
	}
	if signed, ok := signedPart(data, hb.Signature); ok {
		if k.Verify(signed, sig) == nil {
			return nil
		}
	}
	canon, err := CanonicalHeartbeat(hb)
	if err != nil {
		return fmt.Errorf("verify heartbeat: %w", err)
	}
	if err := k.Verify(canon, sig); err != nil {
		return fmt.Errorf("verify heartbeat of node %s: %w", hb.Node, err)
	}
	return nil
}

// signedPart returns data without its trailing `,"signature":"<sig>"`
// member, closed again with '}': for a message a Go signer encoded, the
// canonical encoding the signature covers.
func signedPart(data []byte, sig string) ([]byte, bool) {
	tail := `,"signature":"` + sig + `"}`
	if !bytes.HasSuffix(data, []byte(tail)) {
		return nil, false
	}
	n := len(data) - len(tail)
	out := make([]byte, n+1)
	copy(out, data[:n])
	out[n] = '}'
	return out, true
}
