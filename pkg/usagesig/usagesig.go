// Package usagesig signs and verifies usage events.
//
// An executor signs a batch of events with one ed25519 operation: it builds a
// Merkle tree (RFC 9162) whose leaves are the events' canonical encodings,
// signs the tree head, and gives each event the head, the signature and its
// inclusion proof (wire.UsageBatch). Each event can then be verified alone,
// and a verifier checks each batch signature once (Verifier caches it), so
// the cost per event is a few SHA-256 hashes.
//
// The canonical encoding of an event (version 1) is the byte string
//
//	"tessera.usage.v1" 0x00
//	id request customer supplier node model fragment      (strings)
//	prompt_tokens generated_tokens layer_tokens messages flops (integers)
//	device_type                                           (string)
//	compute_us start end                                  (integers)
//	public_key                                            (string)
//
// where a string is its length as a 4-byte big-endian unsigned integer
// followed by its UTF-8 bytes, an integer is 8 bytes big-endian two's
// complement, and start and end are Unix times in nanoseconds. The leaf hash
// is SHA-256(0x00 || encoding), an interior node SHA-256(0x01 || left ||
// right), and the signed message is "tessera.usage.batch.v1" 0x00 || size as
// 8 bytes big-endian || root.
package usagesig

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// Hash is a SHA-256 digest: a leaf, an interior node or a tree head.
type Hash [sha256.Size]byte

const (
	eventDomain = "tessera.usage.v1\x00"
	rootDomain  = "tessera.usage.batch.v1\x00"
)

var b64 = base64.StdEncoding

// Canonical appends the canonical encoding of ev to dst (see the package
// documentation). The batch signature itself is not part of it.
func Canonical(dst []byte, ev *wire.UsageEvent) []byte {
	str := func(s string) {
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(s)))
		dst = append(dst, s...)
	}
	num := func(v int64) { dst = binary.BigEndian.AppendUint64(dst, uint64(v)) }
	dst = append(dst, eventDomain...)
	str(ev.ID)
	str(ev.Request)
	str(ev.Customer)
	str(ev.Supplier)
	str(ev.Node)
	str(ev.Model)
	str(ev.Fragment)
	num(ev.PromptTokens)
	num(ev.GeneratedTokens)
	num(ev.LayerTokens)
	num(ev.Messages)
	num(ev.FLOPs)
	str(ev.DeviceType)
	num(ev.ComputeUS)
	num(ev.Start.UnixNano())
	num(ev.End.UnixNano())
	str(ev.PublicKey)
	return dst
}

// LeafHash is the Merkle leaf of ev: SHA-256(0x00 || Canonical(ev)).
func LeafHash(ev *wire.UsageEvent) Hash {
	var buf [512]byte
	b := Canonical(append(buf[:0], 0), ev)
	return sha256.Sum256(b)
}

func nodeHash(l, r *Hash) Hash {
	var b [1 + 2*sha256.Size]byte
	b[0] = 1
	copy(b[1:], l[:])
	copy(b[1+sha256.Size:], r[:])
	return sha256.Sum256(b[:])
}

// splitPoint is the largest power of two smaller than n (n > 1).
func splitPoint(n int) int {
	k := 1
	for k<<1 < n {
		k <<= 1
	}
	return k
}

// tree returns the tree head over leaves (RFC 9162 MTH) and appends to each
// leaf's proof the sibling hashes from the leaf upward.
func tree(leaves []Hash, proofs [][]Hash) Hash {
	n := len(leaves)
	if n == 1 {
		return leaves[0]
	}
	k := splitPoint(n)
	l := tree(leaves[:k], proofs[:k])
	r := tree(leaves[k:], proofs[k:])
	for i := 0; i < k; i++ {
		proofs[i] = append(proofs[i], r)
	}
	for i := k; i < n; i++ {
		proofs[i] = append(proofs[i], l)
	}
	return nodeHash(&l, &r)
}

// rootFromProof recomputes the tree head from a leaf and its inclusion proof
// (RFC 9162, section 2.1.3.2); ok is false when the proof's shape does not
// fit index and size.
func rootFromProof(leaf Hash, index, size int, proof []Hash) (Hash, bool) {
	if index < 0 || index >= size {
		return Hash{}, false
	}
	fn, sn := uint64(index), uint64(size-1)
	r := leaf
	for i := range proof {
		p := &proof[i]
		if sn == 0 {
			return Hash{}, false
		}
		if fn&1 == 1 || fn == sn {
			r = nodeHash(p, &r)
			for fn&1 == 0 && fn != 0 {
				fn >>= 1
				sn >>= 1
			}
		} else {
			r = nodeHash(&r, p)
		}
		fn >>= 1
		sn >>= 1
	}
	return r, sn == 0
}

func signedMessage(root Hash, size int) []byte {
	b := make([]byte, 0, len(rootDomain)+8+len(root))
	b = append(b, rootDomain...)
	b = binary.BigEndian.AppendUint64(b, uint64(size))
	return append(b, root[:]...)
}

// Key is a node's signing key: an executor's identity, or an nkey through
// FromKeyPair.
type Key interface {
	// PublicKey is the public user nkey ("U...").
	PublicKey() string
	// Sign returns the ed25519 signature of data.
	Sign(data []byte) ([]byte, error)
}

// Signer signs batches of usage events with a node's key.
type Signer struct {
	key Key
	pub string
}

// NewSigner returns a Signer for key, whose public key must be a user nkey.
func NewSigner(key Key) (*Signer, error) {
	pub := key.PublicKey()
	if !nkeys.IsValidPublicUserKey(pub) {
		return nil, fmt.Errorf("usage signer: %q is not a public user nkey", pub)
	}
	return &Signer{key: key, pub: pub}, nil
}

// FromKeyPair returns a Signer for an nkey pair with its seed.
func FromKeyPair(kp nkeys.KeyPair) (*Signer, error) {
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("usage signer: %w", err)
	}
	return NewSigner(keyPair{kp, pub})
}

type keyPair struct {
	nkeys.KeyPair
	pub string
}

func (k keyPair) PublicKey() string { return k.pub }

// PublicKey is the signer's public nkey, the one the registry must hold for
// the node.
func (s *Signer) PublicKey() string { return s.pub }

// SignUsage sets PublicKey and Batch on every event and signs them all with
// one signature. Every event must be valid (wire.UsageEvent.Validate, apart
// from the signature fields that SignUsage fills).
func (s *Signer) SignUsage(events []*wire.UsageEvent) error {
	n := len(events)
	if n == 0 {
		return nil
	}
	if n > wire.MaxUsageBatch {
		return fmt.Errorf("sign usage: %d events, at most %d per batch", n, wire.MaxUsageBatch)
	}
	leaves := make([]Hash, n)
	for i, ev := range events {
		ev.PublicKey = s.pub
		// Placeholders so that Validate checks everything else.
		ev.Batch = wire.UsageBatch{Root: "-", Size: n, Index: i, Signature: "-"}
		if err := ev.Validate(); err != nil {
			return fmt.Errorf("sign usage: %w", err)
		}
		leaves[i] = LeafHash(ev)
	}
	proofs := make([][]Hash, n)
	root := tree(leaves, proofs)
	sig, err := s.key.Sign(signedMessage(root, n))
	if err != nil {
		return fmt.Errorf("sign usage: %w", err)
	}
	rootS, sigS := b64.EncodeToString(root[:]), b64.EncodeToString(sig)
	for i, ev := range events {
		var proof []string
		if len(proofs[i]) > 0 {
			proof = make([]string, len(proofs[i]))
			for j := range proofs[i] {
				proof[j] = b64.EncodeToString(proofs[i][j][:])
			}
		}
		ev.Batch = wire.UsageBatch{Root: rootS, Size: n, Index: i, Proof: proof, Signature: sigS}
	}
	return nil
}

// SignBatch is SignUsage for a slice of events.
func (s *Signer) SignBatch(events []wire.UsageEvent) error {
	ptrs := make([]*wire.UsageEvent, len(events))
	for i := range events {
		ptrs[i] = &events[i]
	}
	return s.SignUsage(ptrs)
}

// Message returns the message that publishes ev: on subjects.UsageNode of
// its node, with the event id as Nats-Msg-Id so that JetStream drops
// duplicates of a retried publish.
func Message(ev *wire.UsageEvent) (*nats.Msg, error) {
	if err := subjects.Token(ev.Node); err != nil {
		return nil, fmt.Errorf("usage event %q: node: %w", ev.ID, err)
	}
	data, err := json.Marshal(ev)
	if err != nil {
		return nil, fmt.Errorf("usage event %q: %w", ev.ID, err)
	}
	m := nats.NewMsg(subjects.UsageNode(ev.Node))
	m.Header.Set(wire.HdrMsgID, ev.ID)
	m.Data = data
	return m, nil
}

// batchKey identifies one batch signature.
type batchKey struct {
	pub, root, sig string
	size           int
}

// Verifier checks usage event signatures, checking each batch signature
// once: it remembers the most recent verified batches. It is safe for
// concurrent use.
type Verifier struct {
	mu       sync.Mutex
	capacity int
	// Two generations: when cur fills up, it becomes old and a new cur
	// starts, so the most recent batches stay without per-entry bookkeeping.
	cur, old map[batchKey]struct{}
	keys     map[string]ed25519.PublicKey
	checks   atomic.Int64
}

// NewVerifier returns a Verifier that remembers about capacity verified
// batch signatures (at least 16).
func NewVerifier(capacity int) *Verifier {
	capacity = max(capacity, 16)
	return &Verifier{
		capacity: capacity,
		cur:      make(map[batchKey]struct{}),
		old:      make(map[batchKey]struct{}),
		keys:     make(map[string]ed25519.PublicKey),
	}
}

// Verify checks that ev.PublicKey signed ev: its inclusion proof leads from
// the event's leaf to the batch root and the batch signature over that root
// is valid. It does not check that the key belongs to ev.Node; the caller
// compares ev.PublicKey with the key registered for the node. Errors wrap
// ErrMalformed or ErrBadSignature.
func (v *Verifier) Verify(ev *wire.UsageEvent) error {
	b := &ev.Batch
	if b.Size < 1 || b.Size > wire.MaxUsageBatch || len(b.Proof) > 64 {
		return fmt.Errorf("usage event %q: batch size %d with %d proof hashes: %w", ev.ID, b.Size, len(b.Proof), ErrMalformed)
	}
	var root Hash
	if n, err := b64.Decode(root[:], []byte(b.Root)); err != nil || n != len(root) || len(b.Root) != b64.EncodedLen(len(root)) {
		return fmt.Errorf("usage event %q: batch root is not a base64 SHA-256 hash: %w", ev.ID, ErrMalformed)
	}
	proof := make([]Hash, len(b.Proof))
	for i, p := range b.Proof {
		if n, err := b64.Decode(proof[i][:], []byte(p)); err != nil || n != len(proof[i]) || len(p) != b64.EncodedLen(len(proof[i])) {
			return fmt.Errorf("usage event %q: proof hash %d is not a base64 SHA-256 hash: %w", ev.ID, i, ErrMalformed)
		}
	}
	got, ok := rootFromProof(LeafHash(ev), b.Index, b.Size, proof)
	if !ok {
		return fmt.Errorf("usage event %q: inclusion proof of %d hashes does not fit index %d of %d: %w", ev.ID, len(proof), b.Index, b.Size, ErrBadSignature)
	}
	if got != root {
		return fmt.Errorf("usage event %q: event does not match its batch root (altered?): %w", ev.ID, ErrBadSignature)
	}
	key := batchKey{pub: ev.PublicKey, root: b.Root, sig: b.Signature, size: b.Size}
	v.mu.Lock()
	_, seen := v.cur[key]
	if !seen {
		if _, seen = v.old[key]; seen {
			v.remember(key)
		}
	}
	pub, err := v.publicKey(ev.PublicKey)
	v.mu.Unlock()
	if seen {
		return nil
	}
	if err != nil {
		return fmt.Errorf("usage event %q: public key: %v: %w", ev.ID, err, ErrMalformed)
	}
	sig, err := b64.DecodeString(b.Signature)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return fmt.Errorf("usage event %q: batch signature is not a base64 ed25519 signature: %w", ev.ID, ErrMalformed)
	}
	v.checks.Add(1)
	if !ed25519.Verify(pub, signedMessage(root, b.Size), sig) {
		return fmt.Errorf("usage event %q: batch signature does not verify with %s: %w", ev.ID, ev.PublicKey, ErrBadSignature)
	}
	v.mu.Lock()
	v.remember(key)
	v.mu.Unlock()
	return nil
}

// SignatureChecks counts the ed25519 verifications done so far (one per
// batch, not per event, while the batch stays remembered).
func (v *Verifier) SignatureChecks() int64 { return v.checks.Load() }

// remember records a verified batch; v.mu is held.
func (v *Verifier) remember(k batchKey) {
	if len(v.cur) >= v.capacity/2 {
		v.old, v.cur = v.cur, make(map[batchKey]struct{}, v.capacity/2)
	}
	v.cur[k] = struct{}{}
}

// publicKey decodes a public user nkey, caching it; v.mu is held.
func (v *Verifier) publicKey(s string) (ed25519.PublicKey, error) {
	if k, ok := v.keys[s]; ok {
		return k, nil
	}
	raw, err := nkeys.Decode(nkeys.PrefixByteUser, []byte(s))
	if err != nil {
		return nil, err
	}
	if len(raw) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%d bytes, want %d", len(raw), ed25519.PublicKeySize)
	}
	if len(v.keys) >= v.capacity {
		clear(v.keys)
	}
	k := ed25519.PublicKey(raw)
	v.keys[s] = k
	return k, nil
}
