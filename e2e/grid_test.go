// Package e2e tests the whole grid: in one process through internal/local,
// and as separate OS processes.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// testOptions returns the services' defaults for a grid in a temporary
// directory on a free port, without settlement.
func testOptions(t *testing.T) local.Options {
	o, err := local.Defaults(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	o.DataDir, o.NATSPort, o.NoSettlement = t.TempDir(), -1, true
	o.Log = testLog()
	return o
}

// testLog discards service logs unless TESSERA_TEST_LOG is set.
func testLog() *slog.Logger {
	if os.Getenv("TESSERA_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startGrid runs a local grid of n executors without settlement, imports
// the demo model and waits until it is servable.
func startGrid(t *testing.T, n int) (*local.Grid, string) {
	t.Helper()
	o := testOptions(t)
	o.Executors = n
	o.Router.HTTPAddr = "127.0.0.1:0"
	o.Router.AnonymousCustomer = "tester"
	return startGridWith(t, o)
}

// startPipeline is startGrid with the exo strategy: one pipeline over all
// n executors, each holding different layers (the default strategy would
// give a model this small a full replica on every node).
func startPipeline(t *testing.T, n int) (*local.Grid, string) {
	t.Helper()
	o := testOptions(t)
	o.Executors = n
	o.Router.HTTPAddr = "127.0.0.1:0"
	o.Router.AnonymousCustomer = "tester"
	o.Planner.Strategy = "exo"
	return startGridWith(t, o)
}

// startGridWith runs a local grid with options o (see startGrid).
func startGridWith(t *testing.T, o local.Options) (*local.Grid, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := o.Executors
	o.Router.StageTimeout = 5 * time.Second
	o.Planner.Settle = 200 * time.Millisecond
	o.Executor.HeartbeatInterval = 200 * time.Millisecond
	o.Executor.Threads = 1
	g, err := local.Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Import(ctx, testmodel.ID, cp, tp, nil); err != nil {
		t.Fatal(err)
	}
	addr, err := g.HTTPAddr(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitPlanLoaded(t, g, n)
	return g, "http://" + addr
}

// waitPlanLoaded waits for a plan over n nodes that all report their layers.
func waitPlanLoaded(t *testing.T, g *local.Grid, n int) wire.Plan {
	t.Helper()
	ctx := context.Background()
	plans, _ := g.Admin.JS.KeyValue(ctx, subjects.BucketPlans)
	nodes, _ := g.Admin.JS.KeyValue(ctx, subjects.BucketNodes)
	var plan wire.Plan
	bustest.CheckFor(t, time.Minute, 50*time.Millisecond, func() error {
		e, err := plans.Get(ctx, testmodel.ID)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(e.Value(), &plan); err != nil {
			return err
		}
		if len(plan.Assignments) != n {
			return fmt.Errorf("plan has %d nodes, want %d", len(plan.Assignments), n)
		}
		for _, a := range plan.Assignments {
			ne, err := nodes.Get(ctx, a.Node)
			if err != nil {
				return fmt.Errorf("node %s: %w", a.Node, err)
			}
			var r wire.NodeRecord
			_ = json.Unmarshal(ne.Value(), &r)
			want := fmt.Sprintf("%s/layer.%d", testmodel.ID, a.End-1)
			if !strings.Contains(strings.Join(r.Heartbeat.Fragments, " "), want) {
				return fmt.Errorf("node %s has not loaded %s yet", a.Node, want)
			}
		}
		return nil
	})
	return plan
}

func post(t *testing.T, url, body string, hdr ...string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// The reference prompt through three executors, each holding different
// layers, gives llama2.c's greedy output token for token.
func TestThreeExecutorsMatchReference(t *testing.T) {
	g, base := startPipeline(t, 3)
	plan := waitPlanLoaded(t, g, 3)
	seen := map[string]bool{}
	for _, a := range plan.Assignments {
		key := fmt.Sprintf("%d-%d", a.First, a.End)
		if seen[key] || a.End <= a.First {
			t.Fatalf("plan does not give each executor different layers: %+v", plan.Assignments)
		}
		seen[key] = true
	}
	code, b := post(t, base+"/v1/completions", `{"model":"stories260k","prompt":"Once upon a time","max_tokens":60,"temperature":0}`)
	if code != http.StatusOK {
		t.Fatalf("HTTP %d: %s", code, b)
	}
	var res wire.CompletionResponse
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	if got := res.Choices[0].Text; got != testmodel.GreedyText {
		t.Fatalf("text %q\nwant %q", got, testmodel.GreedyText)
	}
	if len(res.Tokens) != len(testmodel.GreedyIDs) {
		t.Fatalf("%d tokens, want %d", len(res.Tokens), len(testmodel.GreedyIDs))
	}
	for i := range res.Tokens {
		if res.Tokens[i] != testmodel.GreedyIDs[i] {
			t.Fatalf("token %d: %d, want %d", i, res.Tokens[i], testmodel.GreedyIDs[i])
		}
	}
	if res.Usage == nil || res.Usage.PromptTokens != 5 || res.Usage.CompletionTokens != 60 || res.Usage.TotalTokens != 65 {
		t.Fatalf("usage %+v", res.Usage)
	}
	if fr := res.Choices[0].FinishReason; fr == nil || *fr != "length" {
		t.Fatalf("finish reason %v", fr)
	}
}

// Bad requests get a 4xx with an OpenAI-style error body naming the
// problem, and the grid keeps serving.
func TestBadInputGetsClearErrors(t *testing.T) {
	_, base := startGrid(t, 2)
	cases := []struct {
		name, body string
		code       int
		want       string
	}{
		{"unknown model", `{"model":"nope","prompt":"x"}`, 404, "nope"},
		{"empty prompt", `{"model":"stories260k","prompt":""}`, 400, "prompt"},
		{"past context", `{"model":"stories260k","prompt":"Once","max_tokens":600}`, 400, "context"},
		{"zero max_tokens", `{"model":"stories260k","prompt":"Once","max_tokens":0}`, 400, "max_tokens"},
		{"malformed JSON", `{"model":"stories260k","prompt":`, 400, "malformed JSON"},
		{"wrong type", `{"model":"stories260k","prompt":5}`, 400, "prompt"},
		{"n > 1", `{"model":"stories260k","prompt":"x","n":2}`, 400, "n must be 1"},
		{"temperature", `{"model":"stories260k","prompt":"x","temperature":7}`, 400, "temperature"},
		{"no model", `{"prompt":"x"}`, 400, "model"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, b := post(t, base+"/v1/completions", tc.body)
			if code != tc.code {
				t.Fatalf("HTTP %d, want %d: %s", code, tc.code, b)
			}
			var e wire.ErrorResponse
			if err := json.Unmarshal(b, &e); err != nil || e.Error.Message == "" || e.Error.Type == "" {
				t.Fatalf("not an OpenAI error body: %s", b)
			}
			if !strings.Contains(e.Error.Message, tc.want) {
				t.Fatalf("error %q does not mention %q", e.Error.Message, tc.want)
			}
		})
	}
	// Still serving.
	code, b := post(t, base+"/v1/completions", `{"model":"stories260k","prompt":"Once upon a time","max_tokens":5,"temperature":0}`)
	if code != 200 {
		t.Fatalf("after bad input: HTTP %d %s", code, b)
	}
	var list wire.ModelList
	resp, err := http.Get(base + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil || len(list.Data) != 1 || list.Data[0].ID != testmodel.ID {
		t.Fatalf("models: %v %+v", err, list)
	}
}

// A truncated checkpoint is refused with an error naming the file and offset.
func TestTruncatedCheckpointImport(t *testing.T) {
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(cp)
	if err != nil {
		t.Fatal(err)
	}
	bad := t.TempDir() + "/truncated.bin"
	if err := os.WriteFile(bad, b[:len(b)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	o := testOptions(t)
	o.Executors = 0
	o.Router.HTTPAddr = ""
	g, err := local.Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	_, err = g.Import(ctx, "broken", bad, tp, nil)
	if err == nil || !strings.Contains(err.Error(), "truncated.bin") || !strings.Contains(err.Error(), "offset 528270") {
		t.Fatalf("got %v, want an error naming truncated.bin and offset 528270", err)
	}
	_ = bytes.MinRead
}

// Concurrent requests are batched on each stage without changing any
// request's output.
func TestConcurrentRequestsKeepTheirOutput(t *testing.T) {
	_, base := startGrid(t, 3)
	const n = 8
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			req, _ := http.NewRequest(http.MethodPost, base+"/v1/completions", strings.NewReader(`{"model":"stories260k","prompt":"Once upon a time","max_tokens":60,"temperature":0}`))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			var res wire.CompletionResponse
			if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
				errs <- err
				return
			}
			if len(res.Choices) == 0 || res.Choices[0].Text != testmodel.GreedyText {
				errs <- fmt.Errorf("HTTP %d: %+v", resp.StatusCode, res)
				return
			}
			errs <- nil
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// A client that disconnects cancels its request: every executor frees the
// request's KV caches.
func TestCancelledRequestFreesCaches(t *testing.T) {
	g, base := startPipeline(t, 3)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions",
		strings.NewReader(`{"model":"stories260k","prompt":"Once upon a time","max_tokens":500,"temperature":0,"stream":true}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	// Each executor reports its open sessions when pinged.
	sessions := func() (int, error) {
		total := 0
		for i := 1; i <= 3; i++ {
			m := nats.NewMsg(subjects.Control(local.ExecutorName(i)))
			m.Data = []byte(`{"op":"ping"}`)
			r, err := g.Admin.NC.RequestMsg(m, time.Second)
			if err != nil {
				return 0, err
			}
			var st struct{ Sessions int }
			if err := json.Unmarshal(r.Data, &st); err != nil {
				return 0, err
			}
			total += st.Sessions
		}
		return total, nil
	}
	sc := bufio.NewScanner(resp.Body)
	id := ""
	for id == "" && sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			var c wire.CompletionResponse
			_ = json.Unmarshal([]byte(line), &c)
			id = c.ID
		}
	}
	// The request is under way: every stage holds its cache.
	if n, err := sessions(); err != nil || n != 3 {
		t.Fatalf("%d sessions open (%v), want 3 while the request runs", n, err)
	}
	cancel()
	resp.Body.Close()
	bustest.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		n, err := sessions()
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("%d sessions still open after the client left", n)
		}
		return nil
	})
	// The head stage's usage shows the request stopped early.
	st, err := g.Admin.JS.Stream(context.Background(), subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	var u wire.UsageEvent
	bustest.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		m, err := st.GetLastMsgForSubject(context.Background(), subjects.UsageNode(local.ExecutorName(3)))
		if err != nil {
			return err
		}
		return json.Unmarshal(m.Data, &u)
	})
	if u.Request != id || u.GeneratedTokens >= 500 {
		t.Fatalf("head usage %+v: want request %s cut short of 500 tokens", u, id)
	}
}
