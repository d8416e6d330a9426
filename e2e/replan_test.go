package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// currentPlan reads the model's plan from KV plans.
func currentPlan(t *testing.T, g *local.Grid) (wire.Plan, error) {
	t.Helper()
	ctx := context.Background()
	kv, err := g.Admin.JS.KeyValue(ctx, subjects.BucketPlans)
	if err != nil {
		return wire.Plan{}, err
	}
	e, err := kv.Get(ctx, testmodel.ID)
	if err != nil {
		return wire.Plan{}, err
	}
	var p wire.Plan
	err = json.Unmarshal(e.Value(), &p)
	p.Version = e.Revision()
	return p, err
}

func planNodes(p wire.Plan) map[string]bool {
	out := map[string]bool{}
	for _, a := range p.Assignments {
		out[a.Node] = true
	}
	return out
}

// Stopping an executor yields a new plan without it within 5 s, and a
// generation started after it completes correctly; a joining executor is
// used by the next plan.
func TestLiveReplan(t *testing.T) {
	g, base := startGrid(t, 3)
	before, err := currentPlan(t, g)
	if err != nil {
		t.Fatal(err)
	}
	if !planNodes(before)[local.ExecutorName(3)] {
		t.Fatalf("exec-3 not in the first plan: %+v", before.Assignments)
	}
	stopped := time.Now()
	if err := g.Kill(local.ExecutorName(3)); err != nil {
		t.Fatal(err)
	}
	var after wire.Plan
	bustest.CheckFor(t, 5*time.Second, 50*time.Millisecond, func() error {
		p, err := currentPlan(t, g)
		if err != nil {
			return err
		}
		if p.Version == before.Version || planNodes(p)[local.ExecutorName(3)] {
			return fmt.Errorf("plan %d still uses exec-3", p.Version)
		}
		after = p
		return nil
	})
	t.Logf("re-planned %v after the stop: %+v", time.Since(stopped).Round(time.Millisecond), after.Assignments)
	code, b := post(t, base+"/v1/completions", `{"model":"stories260k","prompt":"Once upon a time","max_tokens":60,"temperature":0}`)
	if code != 200 {
		t.Fatalf("HTTP %d: %s", code, b)
	}
	var res wire.CompletionResponse
	if err := json.Unmarshal(b, &res); err != nil || res.Choices[0].Text != testmodel.GreedyText {
		t.Fatalf("after re-plan: %v %s", err, b)
	}
	if err := g.StartExecutor(4); err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		p, err := currentPlan(t, g)
		if err != nil {
			return err
		}
		if !planNodes(p)[local.ExecutorName(4)] {
			return fmt.Errorf("plan %d does not use exec-4 yet", p.Version)
		}
		return nil
	})
}
