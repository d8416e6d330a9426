package usagesig

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

var t0 = time.Date(2026, 11, 22, 10, 0, 0, 123456789, time.UTC)

func sampleEvents(n int) []wire.UsageEvent {
	evs := make([]wire.UsageEvent, n)
	for i := range evs {
		evs[i] = wire.UsageEvent{
			ID: fmt.Sprintf("req-%d-node-a-0", i), Request: fmt.Sprintf("req-%d", i), Customer: "acme", Supplier: "gpu-co",
			Node: "node-a", Model: "stories260k", Fragment: "layers[0,5)+embed+head",
			PromptTokens: int64(10 + i), GeneratedTokens: int64(i), LayerTokens: int64(5 * (10 + 2*i)),
			Messages: 3, FLOPs: 1e6, DeviceType: "cpu", ComputeUS: 1500, Start: t0, End: t0.Add(time.Second),
		}
	}
	return evs
}

func newSigner(t testing.TB) *Signer {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	s, err := FromKeyPair(kp)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Every event of every batch size verifies alone, and each batch costs one
// ed25519 verification however many of its events are checked.
func TestSignBatchEveryEventVerifies(t *testing.T) {
	s := newSigner(t)
	v := NewVerifier(1024)
	var batches int64
	for _, n := range []int{1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 33, 100, 257} {
		evs := sampleEvents(n)
		if err := s.SignBatch(evs); err != nil {
			t.Fatal(err)
		}
		batches++
		for i := range evs {
			ev := &evs[i]
			if ev.PublicKey != s.PublicKey() || ev.Batch.Size != n || ev.Batch.Index != i {
				t.Fatalf("n=%d event %d: public key %s, batch %+v", n, i, ev.PublicKey, ev.Batch)
			}
			if err := ev.Validate(); err != nil {
				t.Fatalf("n=%d event %d: %v", n, i, err)
			}
			if err := v.Verify(ev); err != nil {
				t.Fatalf("n=%d event %d: %v", n, i, err)
			}
		}
	}
	if got := v.SignatureChecks(); got != batches {
		t.Fatalf("%d ed25519 checks for %d batches", got, batches)
	}
}

// Any change to a signed event, or a signature from another key, is caught.
func TestAlteredEventsFail(t *testing.T) {
	s := newSigner(t)
	other := newSigner(t)
	cases := []struct {
		name  string
		alter func(evs []wire.UsageEvent) *wire.UsageEvent
		want  error
	}{
		{"prompt tokens", func(e []wire.UsageEvent) *wire.UsageEvent { e[2].PromptTokens++; return &e[2] }, ErrBadSignature},
		{"generated tokens", func(e []wire.UsageEvent) *wire.UsageEvent { e[0].GeneratedTokens += 1000; return &e[0] }, ErrBadSignature},
		{"customer", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Customer = "victim"; return &e[1] }, ErrBadSignature},
		{"end time", func(e []wire.UsageEvent) *wire.UsageEvent { e[3].End = e[3].End.Add(time.Nanosecond); return &e[3] }, ErrBadSignature},
		{"device type", func(e []wire.UsageEvent) *wire.UsageEvent { e[4].DeviceType = "gpu"; return &e[4] }, ErrBadSignature},
		{"public key swapped", func(e []wire.UsageEvent) *wire.UsageEvent { e[0].PublicKey = other.PublicKey(); return &e[0] }, ErrBadSignature},
		{"index", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Batch.Index = 2; return &e[1] }, ErrBadSignature},
		{"size", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Batch.Size = 6; return &e[1] }, ErrBadSignature},
		{"proof of another event", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Batch.Proof = e[2].Batch.Proof; return &e[1] }, ErrBadSignature},
		{"short proof", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Batch.Proof = e[1].Batch.Proof[:1]; return &e[1] }, ErrBadSignature},
		{"proof not base64", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Batch.Proof[0] = "!!"; return &e[1] }, ErrMalformed},
		{"root not base64", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Batch.Root = "xyz"; return &e[1] }, ErrMalformed},
		{"signature garbage", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].Batch.Signature = "c2ln"; return &e[1] }, ErrMalformed},
		{"public key garbage", func(e []wire.UsageEvent) *wire.UsageEvent { e[1].PublicKey = "UNOTAKEY"; return &e[1] }, ErrBadSignature},
		{"re-signed root by another key", func(e []wire.UsageEvent) *wire.UsageEvent {
			forged := sampleEvents(5)
			forged[1].GeneratedTokens = 99999
			if err := other.SignBatch(forged); err != nil {
				t.Fatal(err)
			}
			// The forger keeps the victim node's public key on the event.
			forged[1].PublicKey = e[1].PublicKey
			return &forged[1]
		}, ErrBadSignature},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			evs := sampleEvents(5)
			if err := s.SignBatch(evs); err != nil {
				t.Fatal(err)
			}
			v := NewVerifier(64)
			// Verify a sibling first so that the batch signature is cached:
			// the cache must not let an altered event through.
			if err := v.Verify(&evs[4]); err != nil {
				t.Fatal(err)
			}
			err := v.Verify(tc.alter(evs))
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

// A forged signature over an honest root fails even when the same root was
// verified before with the real signature.
func TestForgedSignatureOnCachedRoot(t *testing.T) {
	s := newSigner(t)
	evs := sampleEvents(3)
	if err := s.SignBatch(evs); err != nil {
		t.Fatal(err)
	}
	v := NewVerifier(64)
	if err := v.Verify(&evs[0]); err != nil {
		t.Fatal(err)
	}
	bad := evs[1]
	sig := []byte(bad.Batch.Signature)
	sig[3] ^= 1
	bad.Batch.Signature = string(sig)
	if err := v.Verify(&bad); !errors.Is(err, ErrBadSignature) && !errors.Is(err, ErrMalformed) {
		t.Fatalf("forged signature accepted: %v", err)
	}
}

// The canonical encoding is the documented byte layout; other languages
// reproduce it from the package comment.
func TestCanonicalLayout(t *testing.T) {
	ev := sampleEvents(1)[0]
	ev.PublicKey = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"
	var want []byte
	want = append(want, "tessera.usage.v1\x00"...)
	for _, s := range []string{ev.ID, ev.Request, ev.Customer, ev.Supplier, ev.Node, ev.Model, ev.Fragment} {
		want = binary.BigEndian.AppendUint32(want, uint32(len(s)))
		want = append(want, s...)
	}
	for _, v := range []int64{ev.PromptTokens, ev.GeneratedTokens, ev.LayerTokens, ev.Messages, ev.FLOPs} {
		want = binary.BigEndian.AppendUint64(want, uint64(v))
	}
	want = binary.BigEndian.AppendUint32(want, uint32(len(ev.DeviceType)))
	want = append(want, ev.DeviceType...)
	for _, v := range []int64{ev.ComputeUS, ev.Start.UnixNano(), ev.End.UnixNano()} {
		want = binary.BigEndian.AppendUint64(want, uint64(v))
	}
	want = binary.BigEndian.AppendUint32(want, uint32(len(ev.PublicKey)))
	want = append(want, ev.PublicKey...)
	if got := Canonical(nil, &ev); string(got) != string(want) {
		t.Fatalf("canonical encoding\n got %x\nwant %x", got, want)
	}
	leaf := LeafHash(&ev)
	if want := sha256.Sum256(append([]byte{0}, want...)); leaf != want {
		t.Fatalf("leaf %x, want %x", leaf, want)
	}
	// Pinned so that a change of the encoding cannot go unnoticed: it would
	// invalidate every signature in flight.
	const pinned = "3038a390cefa95d4d0ffc3631273d6d5b175b0d2bff47ccb59b5ea6bbd6be178"
	if hex.EncodeToString(leaf[:]) != pinned {
		t.Fatalf("leaf hash %x, pinned %s: the encoding changed (that needs a new version)", leaf, pinned)
	}
}

// Merkle roots match RFC 9162's definition computed independently.
func TestRootMatchesDefinition(t *testing.T) {
	var mth func(d [][]byte) [32]byte
	mth = func(d [][]byte) [32]byte {
		if len(d) == 1 {
			return sha256.Sum256(append([]byte{0}, d[0]...))
		}
		k := 1
		for k*2 < len(d) {
			k *= 2
		}
		l, r := mth(d[:k]), mth(d[k:])
		return sha256.Sum256(append(append([]byte{1}, l[:]...), r[:]...))
	}
	for n := 1; n <= 20; n++ {
		evs := sampleEvents(n)
		leaves := make([]Hash, n)
		data := make([][]byte, n)
		for i := range evs {
			leaves[i] = LeafHash(&evs[i])
			data[i] = Canonical(nil, &evs[i])
		}
		got := tree(leaves, make([][]Hash, n))
		if want := mth(data); got != Hash(want) {
			t.Fatalf("n=%d: root %x, want %x", n, got, want)
		}
	}
}

func TestSignBatchRejectsInvalidEvents(t *testing.T) {
	s := newSigner(t)
	evs := sampleEvents(3)
	evs[1].Customer = "a.b"
	if err := s.SignBatch(evs); err == nil {
		t.Fatal("event with customer a.b signed")
	}
	if _, err := FromKeyPair(mustAccount(t)); err == nil {
		t.Fatal("account key accepted as node key")
	}
}

func mustAccount(t *testing.T) nkeys.KeyPair {
	kp, err := nkeys.CreateAccount()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func TestMessage(t *testing.T) {
	s := newSigner(t)
	evs := sampleEvents(1)
	if err := s.SignBatch(evs); err != nil {
		t.Fatal(err)
	}
	m, err := Message(&evs[0])
	if err != nil {
		t.Fatal(err)
	}
	if m.Subject != subjects.UsageNode("node-a") || m.Header.Get(wire.HdrMsgID) != evs[0].ID {
		t.Fatalf("subject %s, msg id %q", m.Subject, m.Header.Get(wire.HdrMsgID))
	}
	var back wire.UsageEvent
	if err := wire.Decode(m.Data, &back); err != nil {
		t.Fatal(err)
	}
	if err := NewVerifier(16).Verify(&back); err != nil {
		t.Fatalf("decoded event: %v", err)
	}
}

func BenchmarkVerifyBatched(b *testing.B) {
	s := newSigner(b)
	evs := sampleEvents(256)
	if err := s.SignBatch(evs); err != nil {
		b.Fatal(err)
	}
	v := NewVerifier(1024)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := v.Verify(&evs[i%len(evs)]); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSignBatch256(b *testing.B) {
	s := newSigner(b)
	evs := sampleEvents(256)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := s.SignBatch(evs); err != nil {
			b.Fatal(err)
		}
	}
}

// identity is a node key as the executor holds it: a public key and a Sign
// method, the seed out of reach.
type identity struct{ kp nkeys.KeyPair }

func (id identity) PublicKey() string {
	pub, _ := id.kp.PublicKey()
	return pub
}

func (id identity) Sign(data []byte) ([]byte, error) { return id.kp.Sign(data) }

// Any Key signs; SignUsage signs events in place through pointers.
func TestSignUsageWithKey(t *testing.T) {
	kp, _ := nkeys.CreateUser()
	s, err := NewSigner(identity{kp})
	if err != nil {
		t.Fatal(err)
	}
	evs := sampleEvents(3)
	ptrs := []*wire.UsageEvent{&evs[2], &evs[0], &evs[1]}
	if err := s.SignUsage(ptrs); err != nil {
		t.Fatal(err)
	}
	v := NewVerifier(16)
	for i, ev := range ptrs {
		if ev.Batch.Index != i || ev.PublicKey != s.PublicKey() {
			t.Fatalf("event %d: %+v", i, ev.Batch)
		}
		if err := v.Verify(ev); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := NewSigner(identity{mustAccount(t)}); err == nil {
		t.Fatal("account key accepted as node key")
	}
}
