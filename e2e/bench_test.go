package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// benchModelID is the stories110M-shaped synthetic model served by the
// router benchmarks.
const benchModelID = "synth110m"

// startBenchGrid runs a grid of three executors sharing one compute pool,
// with the synthetic stories110M-shaped model imported, planned with
// strategy, and waits until it is servable.
func startBenchGrid(b *testing.B, strategy string, executors int) (*local.Grid, string) {
	b.Helper()
	o, err := local.Defaults(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	o.DataDir, o.NATSPort, o.NoSettlement, o.Executors, o.SharedPool = b.TempDir(), -1, true, executors, true
	o.Log = testLog()
	o.Router.HTTPAddr = "127.0.0.1:0"
	o.Router.AnonymousCustomer = "bench"
	o.Router.CustomerConcurrency = 0
	o.Router.StageTimeout = 30 * time.Second
	o.Planner.Strategy = strategy
	// Speed challenges time a node's answer; in one process whose nodes
	// share two cores under full load they would quarantine healthy nodes.
	o.Registry.ChallengeEvery = -1
	o.Planner.Settle = 300 * time.Millisecond
	o.Executor.HeartbeatInterval = time.Second
	o.Executor.MaxBatch = 32
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	g, err := local.Start(ctx, o)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(g.Close)
	ck, err := model.Synthesize(testmodel.BenchConfig, testmodel.BenchSeed)
	if err != nil {
		b.Fatal(err)
	}
	tok, err := model.SynthesizeTokenizer(testmodel.BenchConfig.Vocab, testmodel.BenchSeed)
	if err != nil {
		b.Fatal(err)
	}
	blobs, m, err := model.Fragments(benchModelID, ck, tok, model.FragmentOptions{DType: model.DTypeF32})
	if err != nil {
		b.Fatal(err)
	}
	st, err := fragstore.Open(ctx, g.Admin.JS)
	if err != nil {
		b.Fatal(err)
	}
	if err := st.Import(ctx, blobs, tok, m, nil); err != nil {
		b.Fatal(err)
	}
	addr, err := g.HTTPAddr(ctx)
	if err != nil {
		b.Fatal(err)
	}
	base := "http://" + addr
	// Servable once a short request completes.
	bustest.CheckFor(b, 5*time.Minute, 500*time.Millisecond, func() error {
		_, err := stream(context.Background(), base, 2)
		return err
	})
	return g, base
}

// streamResult is one streamed completion's timing.
type streamResult struct {
	start  time.Time
	chunks []time.Time
	tokens int
}

// stream runs one greedy streaming completion of up to n tokens and
// records when each chunk arrived.
func stream(ctx context.Context, base string, n int) (streamResult, error) {
	body := fmt.Sprintf(`{"model":%q,"prompt":"Once upon a time","max_tokens":%d,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}`, benchModelID, n)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions", strings.NewReader(body))
	r := streamResult{start: time.Now()}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return r, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		var c wire.CompletionResponse
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			return r, err
		}
		if c.Usage != nil {
			r.tokens = c.Usage.CompletionTokens
			continue
		}
		if len(c.Choices) > 0 && c.Choices[0].Text != "" {
			r.chunks = append(r.chunks, time.Now())
		}
	}
	if len(r.chunks) == 0 {
		return r, fmt.Errorf("no chunks")
	}
	return r, sc.Err()
}

func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// BenchmarkStreams measures, through three stages on loopback with the
// stories110M-shaped model, time to first token and inter-token latency
// (p50, p99) and total decode tokens/s at 1, 8 and 32 concurrent streams.
//
//	go test ./e2e -run '^$' -bench Streams -benchtime 1x -timeout 60m
func BenchmarkStreams(b *testing.B) {
	_, base := startBenchGrid(b, "exo", 3)
	const tokens = 64
	figures := map[string]float64{}
	for _, n := range []int{1, 8, 32} {
		var mu sync.Mutex
		var ttft, itl []float64
		total, decodeRate := 0, 0.0
		var wg sync.WaitGroup
		start := time.Now()
		var firstErr error
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := stream(context.Background(), base, tokens)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					firstErr = err
					return
				}
				ttft = append(ttft, r.chunks[0].Sub(r.start).Seconds()*1e3)
				for j := 1; j < len(r.chunks); j++ {
					itl = append(itl, r.chunks[j].Sub(r.chunks[j-1]).Seconds()*1e3)
				}
				total += r.tokens
				if k := len(r.chunks); k > 1 {
					decodeRate += float64(k-1) / r.chunks[k-1].Sub(r.chunks[0]).Seconds()
				}
			}()
		}
		wg.Wait()
		if firstErr != nil {
			b.Fatal(firstErr)
		}
		wall := time.Since(start).Seconds()
		tag := fmt.Sprintf("streams_%d", n)
		figures["ttft_p50_ms_"+tag] = percentile(ttft, 0.5)
		figures["ttft_p99_ms_"+tag] = percentile(ttft, 0.99)
		figures["itl_p50_ms_"+tag] = percentile(itl, 0.5)
		figures["itl_p99_ms_"+tag] = percentile(itl, 0.99)
		// Decode rate: the streams' decode rates (tokens after the first over
		// the time from first to last) summed, as they run side by side;
		// total: every token over the wall time, prefills and queueing included.
		figures["decode_tok_s_"+tag] = decodeRate
		figures["total_tok_s_"+tag] = float64(total) / wall
		b.Logf("%2d streams: TTFT p50 %.1f ms p99 %.1f ms, ITL p50 %.1f ms p99 %.1f ms, decode %.1f tokens/s, total %.1f tokens/s", n,
			figures["ttft_p50_ms_"+tag], figures["ttft_p99_ms_"+tag], figures["itl_p50_ms_"+tag], figures["itl_p99_ms_"+tag], figures["decode_tok_s_"+tag], figures["total_tok_s_"+tag])
	}
	figures["decode_streams_32_vs_1"] = figures["decode_tok_s_streams_32"] / figures["decode_tok_s_streams_1"]
	if err := benchfig.Record(figures); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkFailover measures what an executor's death at token 30 of 60
// costs a greedy generation: the model has a full replica on each of three
// executors (strategy petals places one on each); the one serving the
// request is killed, and the router re-routes to another, rebuilding its KV
// cache from the token prefix (the prompt and the 30 tokens, one prefill).
//
//	go test ./e2e -run '^$' -bench Failover -benchtime 1x -timeout 60m
func BenchmarkFailover(b *testing.B) {
	g, base := startBenchGrid(b, "petals", 3)
	// serving asks each executor, as the router's liveness ping does, how
	// many request sessions it holds now: the one with a session serves
	// the generation.
	serving := func() string {
		for i := 1; i <= 3; i++ {
			name := local.ExecutorName(i)
			m, err := g.Admin.NC.Request(subjects.Control(name), []byte(`{"op":"ping"}`), time.Second)
			if err != nil {
				continue
			}
			var p struct {
				Sessions int `json:"sessions"`
			}
			if json.Unmarshal(m.Data, &p) == nil && p.Sessions > 0 {
				return name
			}
		}
		return ""
	}
	base60, err := stream(context.Background(), base, 60)
	if err != nil {
		b.Fatal(err)
	}
	clean := base60.chunks[len(base60.chunks)-1].Sub(base60.start)
	// The same generation; the node serving it dies at chunk 30.
	body := fmt.Sprintf(`{"model":%q,"prompt":"Once upon a time","max_tokens":60,"temperature":0,"stream":true}`, benchModelID)
	start := time.Now()
	resp, err := http.Post(base+"/v1/completions", "application/json", strings.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	chunks, killed, victim := 0, false, ""
	var last time.Time
	var gaps []float64 // between chunks, ms
	var atKill float64 // the gap from chunk 30 to chunk 31, ms
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		chunks++
		now := time.Now()
		if chunks > 1 {
			gap := now.Sub(last).Seconds() * 1e3
			if chunks == 31 {
				atKill = gap
			} else {
				gaps = append(gaps, gap)
			}
		}
		last = now
		if chunks == 30 && !killed {
			victim = serving()
			if victim == "" {
				b.Fatal("no executor reports the request's session")
			}
			if err := g.Kill(victim); err != nil {
				b.Fatal(err)
			}
			killed = true
		}
	}
	if !killed || chunks < 60 {
		b.Fatalf("killed %v, %d chunks", killed, chunks)
	}
	failed := last.Sub(start)
	// The added delay: the wait for the token after the kill beyond the
	// run's median inter-token latency (whole runs differ by more than
	// that on a shared machine; both are logged).
	added := atKill - percentile(gaps, 0.5)
	b.Logf("killed %s at token 30: the next token came after %.0f ms against a median of %.0f ms (+%.0f ms; the prompt and the 30 tokens were recomputed on another replica); whole generation %v against %v without the failure",
		victim, atKill, percentile(gaps, 0.5), added, failed.Round(time.Millisecond), clean.Round(time.Millisecond))
	if err := benchfig.Record(map[string]float64{"failover_added_delay_ms": added, "failover_generation_ms": failed.Seconds() * 1e3, "failover_clean_generation_ms": clean.Seconds() * 1e3}); err != nil {
		b.Fatal(err)
	}
}
