package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/nodesig"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// BenchmarkHeartbeat measures the registry's work per heartbeat of a live
// node: decoding, checking, verifying the signature, updating the node and
// (every RefreshBeats beats) writing its record.
func BenchmarkHeartbeat(b *testing.B) {
	s := bustest.Server(b)
	ctx := context.Background()
	r, err := New(ctx, Config{ChallengeEvery: -1}, Deps{Bus: bustest.Connect(b, s, "registry")})
	if err != nil {
		b.Fatal(err)
	}
	const nodes = 100
	beats := 1 + b.N/nodes
	msgs := make([]*nats.Msg, 0, nodes*beats)
	for i := range nodes {
		id := fmt.Sprintf("n%03d", i)
		for _, data := range signedBeats(b, id, beats) {
			msgs = append(msgs, &nats.Msg{Subject: subjects.Heartbeat(id), Data: data})
		}
	}
	b.ResetTimer()
	for i := range b.N {
		// Node by node, beat by beat: every heartbeat is newer than the last.
		m := msgs[(i%nodes)*beats+i/nodes]
		r.onHeartbeat(ctx, m, time.Now())
	}
	b.StopTimer()
	if st := r.Stats(); st.HeartbeatsAccepted != uint64(b.N) {
		b.Fatalf("%d of %d heartbeats accepted: %+v", st.HeartbeatsAccepted, b.N, st.Rejected)
	}
}

// BenchmarkIntake measures heartbeats arriving over NATS at full speed,
// through the registry's subscription, workers and record writes.
func BenchmarkIntake(b *testing.B) {
	s := bustest.Server(b)
	ctx, cancel := context.WithCancel(context.Background())
	r, err := New(ctx, Config{ChallengeEvery: -1}, Deps{Bus: bustest.Connect(b, s, "registry")})
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	pub := bustest.Connect(b, s, "nodes")
	const nodes = 1000
	beats := 1 + b.N/nodes
	msgs := make([][]byte, 0, nodes*beats)
	subjectsOf := make([]string, 0, nodes*beats)
	for i := range nodes {
		id := fmt.Sprintf("n%04d", i)
		for _, data := range signedBeats(b, id, beats) {
			msgs = append(msgs, data)
			subjectsOf = append(subjectsOf, subjects.Heartbeat(id))
		}
	}
	time.Sleep(200 * time.Millisecond)
	b.ResetTimer()
	for i := range b.N {
		j := (i%nodes)*beats + i/nodes
		_ = pub.NC.Publish(subjectsOf[j], msgs[j])
	}
	for r.Stats().HeartbeatsAccepted < uint64(b.N) {
		time.Sleep(time.Millisecond)
	}
}

// signedBeats returns a node's first n heartbeats, signed and encoded.
func signedBeats(b *testing.B, id string, n int) [][]byte {
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	hb := wire.Heartbeat{Node: id, Supplier: "acme", Region: "eu-west", IntervalMS: 1000, State: wire.NodeReady,
		Devices:      []wire.Device{{Kind: "gpu", Name: "NVIDIA A100-SXM4-80GB", UUID: "GPU-" + id, MemoryTotal: 80 << 30, MemoryFree: 20 << 30, ComputeCapability: "8.0", Utilization: 63}},
		MemoryBudget: 72 << 30, Models: []string{"m"}, Fragments: []string{"m/layer.0", "m/layer.1"},
		Speed: []wire.SpeedSample{{Model: "m", DType: "f16", Device: "GPU-" + id, DecodeTokS: 2400, PrefillTokS: 41000}}}
	out := make([][]byte, 0, n)
	t0 := time.Now().UTC()
	for k := range n {
		hb.Seq, hb.Time = uint64(k+1), t0.Add(time.Duration(k)*time.Second)
		hb.PublicKey, hb.Signature = "", ""
		if err := nodesig.SignHeartbeat(&hb, pub, kp.Sign); err != nil {
			b.Fatal(err)
		}
		data, err := json.Marshal(&hb)
		if err != nil {
			b.Fatal(err)
		}
		out = append(out, data)
	}
	return out
}
