package registry_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor"
	"github.com/tessera-grid/tessera/services/registry"
)

// Nodes holding some of a mixture's experts are challenged on what they
// hold (a layer's trunk or one expert): the honest one passes, the one
// whose answers are wrong is quarantined.
func TestExpertHoldersAreChallenged(t *testing.T) {
	g := startRegistry(t, registry.Config{MissedBeats: 8, ChallengeEvery: 100 * time.Millisecond, ChallengeRetry: time.Second, ChallengeSlack: 5 * time.Second})
	ctx := context.Background()
	cfg := wire.ModelConfig{Dim: 32, HiddenDim: 64, Layers: 2, Heads: 4, KVHeads: 2, Vocab: 300, SeqLen: 32, SharedClassifier: true, Experts: 4, TopK: 2}
	ck, err := model.Synthesize(cfg, 5)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := model.SynthesizeTokenizer(cfg.Vocab, 5)
	if err != nil {
		t.Fatal(err)
	}
	blobs, man, err := model.Fragments("moe", ck, tok, model.FragmentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := fragstore.Open(ctx, g.client.JS)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Import(ctx, blobs, tok, man, nil); err != nil {
		t.Fatal(err)
	}
	p := wire.Plan{Model: "moe", Strategy: "test", Layers: cfg.Layers, Created: time.Now().UTC(),
		Assignments: []wire.Assignment{
			{Node: "exec-good", First: 0, End: cfg.Layers, Experts: []int{0, 1}, Embed: true, Head: true},
			{Node: "exec-bad", First: 0, End: cfg.Layers, Experts: []int{2, 3}, Embed: true, Head: true}},
		Stages: []wire.Stage{{First: 0, End: cfg.Layers, Replicas: []string{"exec-good", "exec-bad"}}}}
	b, _ := json.Marshal(p)
	kv, err := g.client.JS.KeyValue(ctx, subjects.BucketPlans)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "moe", b); err != nil {
		t.Fatal(err)
	}
	var tampered atomic.Int64
	startExecutor(t, g, "exec-good", executor.Config{}, executor.Deps{})
	startExecutor(t, g, "exec-bad", executor.Config{}, executor.Deps{TamperChallenge: func(out []float32) {
		tampered.Add(1)
		out[0] += 1
	}})
	rec := waitRecord(t, g, "exec-bad", "quarantined", func(r wire.NodeRecord) bool { return r.State == wire.NodeQuarantined })
	if !strings.Contains(rec.QuarantineReason, "wrong output") || !strings.Contains(rec.QuarantineReason, "moe") {
		t.Errorf("quarantine reason %q, want wrong output on the mixture", rec.QuarantineReason)
	}
	bustest.CheckFor(t, 20*time.Second, 50*time.Millisecond, func() error {
		if s := g.reg.Stats(); s.ChallengesPassed < 2 {
			return fmt.Errorf("challenges passed: %d", s.ChallengesPassed)
		}
		return nil
	})
	r := waitRecord(t, g, "exec-good", "ready", func(r wire.NodeRecord) bool { return r.State == wire.NodeReady })
	for _, f := range []string{"moe/layer.0", "moe/" + model.ExpertFragment(1, 1)} {
		if !strings.Contains(strings.Join(r.Heartbeat.Fragments, " "), f) {
			t.Errorf("exec-good holds %v, want %s among them", r.Heartbeat.Fragments, f)
		}
	}
	if tampered.Load() == 0 {
		t.Fatal("the bad node was never challenged")
	}
}
