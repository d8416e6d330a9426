// Package chaos kills parts of a grid that runs as separate processes on a
// real 3-server NATS cluster while it serves a stream of generations, and
// checks that every generation completes or fails with a clear error and
// that no usage event is lost or settled twice.
package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/router"
	"github.com/tessera-grid/tessera/services/settlement"
)

const (
	// executors is how many executors serve; one of them is killed.
	executors = 4
	// workers is how many generations run at once.
	workers = 6
	// maxTokens is each generation's length (greedy: the reference's first
	// maxTokens tokens).
	maxTokens = 16
	// layers is the demo model's depth.
	layers = 5
	// database is the ledger's ClickHouse database.
	database = "tessera_chaos"
	// errorPause is how long a client waits after an error response.
	errorPause = 200 * time.Millisecond
)

// natsServer is one server of the cluster, as a process.
type natsServer struct {
	*proctest.Proc
	name     string
	url      string
	monitor  string
	storeDir string
}

// startCluster starts deploy/nats/cluster/nats-{1,2,3}.conf as three
// processes on loopback: host names, ports and paths of the shipped files
// are replaced, and the accounts are left out (this test is about faults,
// deploy/deploytest about permissions). It returns the servers and the
// comma-separated client URLs.
func startCluster(t *testing.T, bin string) ([]*natsServer, string) {
	t.Helper()
	const n = 3
	ports := proctest.FreePorts(t, 4*n)
	client, monitor, route, leaf := ports[:n], ports[n:2*n], ports[2*n:3*n], ports[3*n:]
	dir := t.TempDir()
	var routes []string
	for i := range n {
		routes = append(routes, fmt.Sprintf("nats-route://nats-%d:6222", i+1), fmt.Sprintf("nats-route://127.0.0.1:%d", route[i]))
	}
	var servers []*natsServer
	var urls []string
	for i := range n {
		name := fmt.Sprintf("nats-%d", i+1)
		store := filepath.Join(dir, name)
		conf := filepath.Join(dir, name+".conf")
		proctest.Localise(t, "cluster/"+name+".conf", conf, append([]string{
			"listen: 0.0.0.0:4222", fmt.Sprintf("listen: 127.0.0.1:%d", client[i]),
			"http: 127.0.0.1:8222", fmt.Sprintf("http: 127.0.0.1:%d", monitor[i]),
			`store_dir: "/var/lib/nats/jetstream"`, fmt.Sprintf("store_dir: %q", store),
			"listen: 0.0.0.0:6222", fmt.Sprintf("listen: 127.0.0.1:%d", route[i]),
			"listen: 0.0.0.0:7422", fmt.Sprintf("listen: 127.0.0.1:%d", leaf[i]),
			"include accounts.conf", "",
		}, routes...)...)
		s := &natsServer{Proc: proctest.Start(t, name, bin+"/nats-server", nil, "-c", conf), name: name,
			url: fmt.Sprintf("nats://127.0.0.1:%d", client[i]), monitor: fmt.Sprintf("http://127.0.0.1:%d", monitor[i]), storeDir: store}
		servers = append(servers, s)
		urls = append(urls, s.url)
	}
	for _, s := range servers {
		s.waitHealthy(t)
	}
	return servers, strings.Join(urls, ",")
}

// waitHealthy waits until the server serves JetStream (its monitoring
// endpoint's health check passes).
func (s *natsServer) waitHealthy(t *testing.T) {
	t.Helper()
	bustest.CheckFor(t, 60*time.Second, 50*time.Millisecond, func() error {
		if s.Exited() {
			t.Fatalf("%s exited: %v\n%s", s.name, s.Err(), s.Tail(20))
		}
		resp, err := http.Get(s.monitor + "/healthz")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			return fmt.Errorf("%s: %s", s.name, b)
		}
		return nil
	})
}

// clients returns the names of the clients connected to the server.
func (s *natsServer) clients() ([]string, error) {
	resp, err := http.Get(s.monitor + "/connz?limit=1024")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var cz struct {
		Connections []struct {
			Name string `json:"name"`
		} `json:"connections"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&cz); err != nil {
		return nil, err
	}
	var out []string
	for _, c := range cz.Connections {
		out = append(out, c.Name)
	}
	return out, nil
}

// outcome is one generation's result as its client saw it.
type outcome struct {
	start, end time.Time
	status     int
	id         string
	failovers  string
	// clientErr is a transport error or timeout: the router never answered.
	clientErr error
	// problem is set when a 200 response is not the reference generation
	// or an error response does not say clearly what went wrong.
	problem string
	message string
}

// load runs workers that each generate in a loop until ctx ends.
type load struct {
	url    string
	client *http.Client

	mu       sync.Mutex
	outcomes []outcome
	wg       sync.WaitGroup
}

func (l *load) run(ctx context.Context) {
	for range workers {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				o := l.one()
				l.mu.Lock()
				l.outcomes = append(l.outcomes, o)
				l.mu.Unlock()
				if o.status != http.StatusOK {
					// As a client does after an error, pause before the next
					// request instead of hammering the router.
					time.Sleep(errorPause)
				}
			}
		})
	}
}

// one sends one generation, with no context of its own: a generation the
// load's end interrupts would count as a client error.
func (l *load) one() outcome {
	o := outcome{start: time.Now()}
	body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":%d,"temperature":0}`, testmodel.ID, testmodel.Prompt, maxTokens)
	resp, err := l.client.Post(l.url, "application/json", strings.NewReader(body))
	o.end = time.Now()
	if err != nil {
		o.clientErr = err
		return o
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	o.end = time.Now()
	o.status = resp.StatusCode
	o.failovers = resp.Header.Get(router.HdrFailovers)
	if resp.StatusCode == http.StatusOK {
		var res wire.CompletionResponse
		if err := json.Unmarshal(b, &res); err != nil {
			o.problem = fmt.Sprintf("undecodable response %q: %v", b, err)
			return o
		}
		o.id = res.ID
		if !slices.Equal(res.Tokens, testmodel.GreedyIDs[:maxTokens]) || res.Usage == nil || res.Usage.CompletionTokens != maxTokens {
			o.problem = fmt.Sprintf("tokens %v, want the reference's %v", res.Tokens, testmodel.GreedyIDs[:maxTokens])
		}
		return o
	}
	var er wire.ErrorResponse
	if err := json.Unmarshal(b, &er); err != nil || er.Error.Message == "" || er.Error.Code == nil || *er.Error.Code == "" {
		o.problem = fmt.Sprintf("HTTP %d without a clear error: %q", resp.StatusCode, b)
		return o
	}
	o.message = *er.Error.Code + ": " + er.Error.Message
	return o
}

// completed counts the generations that completed so far.
func (l *load) completed() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, o := range l.outcomes {
		if o.status == http.StatusOK && o.problem == "" {
			n++
		}
	}
	return n
}

// progress waits until n more generations completed than when it was
// called: the grid serves.
func (l *load) progress(t *testing.T, n int, timeout time.Duration, what string) {
	t.Helper()
	from := l.completed()
	start := time.Now()
	bustest.CheckFor(t, timeout, 50*time.Millisecond, func() error {
		if got := l.completed() - from; got < n {
			return fmt.Errorf("%s: %d of %d generations completed", what, got, n)
		}
		return nil
	})
	t.Logf("  %s: %d generations completed in %v", what, n, time.Since(start).Round(time.Millisecond))
}

// window is a time a fault lasted: from the kill until the part was back.
type window struct{ from, to time.Time }

func (w window) overlaps(o outcome) bool { return o.start.Before(w.to) && o.end.After(w.from) }

// TestChaos: a real 3-server NATS cluster (deploy/nats/cluster), every
// service and four executors as processes, settlement on ClickHouse. While
// six clients generate continuously, one NATS server (the router's), one
// executor and settlement are killed with SIGKILL and restarted later.
// Every generation must complete with the reference tokens or fail with a
// clear HTTP error, none may hang, and the ledger must hold every usage
// event of stream USAGE exactly once.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a NATS cluster, ClickHouse and eight grid processes")
	}
	began := time.Now()
	bin := t.TempDir()
	proctest.Build(t, bin)
	chAddr := proctest.ClickHouse(t)
	ledger, err := clickhouse.Open(&clickhouse.Options{Addr: []string{chAddr}, Auth: clickhouse.Auth{Username: "default"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ledger.Close() })
	servers, urls := startCluster(t, bin)
	t.Logf("NATS cluster: %s", urls)

	ctx := context.Background()
	admin, err := bus.Connect(ctx, config.NATS{URL: urls}, nil, "chaos-admin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(admin.NC.Close)
	bustest.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return bus.Bootstrap(bctx, admin.JS, 3)
	})

	httpPort := proctest.FreePort(t)
	common := []string{"NATS_URL=" + urls, "NATS_REPLICAS=3", "TESSERA_LOG_LEVEL=info"}
	env := func(extra ...string) []string { return append(slices.Clone(common), extra...) }
	proctest.Start(t, "registry", bin+"/tessera-registry", env())
	// One pipeline over the executors: every generation crosses all of them.
	proctest.Start(t, "planner", bin+"/tessera-planner", env("TESSERA_PLANNER_SETTLE=300ms", "TESSERA_PLANNER_STRATEGY=exo"))
	settlementProc := proctest.Start(t, "settlement", bin+"/tessera-settlement", env(
		"TESSERA_SETTLEMENT_CLICKHOUSE_ADDR="+chAddr, "TESSERA_SETTLEMENT_CLICKHOUSE_DATABASE="+database,
		"TESSERA_SETTLEMENT_BATCH_WAIT=100ms", "TESSERA_SETTLEMENT_RETRY_MAX=1s"))
	proctest.Start(t, "router", bin+"/tessera-router", env(
		fmt.Sprintf("TESSERA_ROUTER_HTTP_ADDR=127.0.0.1:%d", httpPort), "TESSERA_ROUTER_ANONYMOUS_CUSTOMER=chaos",
		"TESSERA_ROUTER_STAGE_TIMEOUT=2s", "TESSERA_ROUTER_FAILOVER_WAIT=20s", "TESSERA_ROUTER_REQUEST_TIMEOUT=45s",
		"TESSERA_ROUTER_CUSTOMER_CONCURRENCY=0"))
	execs := make([]*proctest.Proc, executors)
	stateDirs := make([]string, executors)
	for i := range execs {
		stateDirs[i] = t.TempDir()
		execs[i] = proctest.Start(t, fmt.Sprintf("exec-%d", i+1), bin+"/tessera-executor", env(
			fmt.Sprintf("TESSERA_EXECUTOR_NODE_ID=exec-%d", i+1), "TESSERA_EXECUTOR_STATE_DIR="+stateDirs[i],
			"TESSERA_EXECUTOR_HEARTBEAT_INTERVAL=300ms", "TESSERA_EXECUTOR_THREADS=1", "TESSERA_EXECUTOR_SPEED_TEST=200ms",
			"TESSERA_EXECUTOR_SESSION_IDLE=10s", "TESSERA_EXECUTOR_DRAIN_TIMEOUT=20s", "TESSERA_EXECUTOR_DRAIN_IDLE=1s"))
	}
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 30*time.Second, 200*time.Millisecond, func() error {
		imp := exec.Command(bin+"/tessera", "model", "import", "--id", testmodel.ID, "--tokenizer", tp, cp)
		imp.Env = append(os.Environ(), env()...)
		if out, err := imp.CombinedOutput(); err != nil {
			return fmt.Errorf("import: %v: %s", err, out)
		}
		return nil
	})
	planKV, err := admin.JS.KeyValue(ctx, subjects.BucketPlans)
	if err != nil {
		t.Fatal(err)
	}
	waitPlan := func(nodes int, what string) {
		t.Helper()
		bustest.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
			e, err := planKV.Get(ctx, testmodel.ID)
			if err != nil {
				return err
			}
			var p wire.Plan
			if err := json.Unmarshal(e.Value(), &p); err != nil {
				return err
			}
			if len(p.Assignments) != nodes {
				return fmt.Errorf("%s: plan v%d over %d nodes, want %d", what, e.Revision(), len(p.Assignments), nodes)
			}
			return nil
		})
	}
	waitPlan(executors, "start")

	url := fmt.Sprintf("http://127.0.0.1:%d/v1/completions", httpPort)
	// The router answers within its request timeout (45s); a client that
	// waits longer than that has found a hang.
	l := &load{url: url, client: &http.Client{Timeout: 75 * time.Second}}
	bustest.CheckFor(t, 60*time.Second, 200*time.Millisecond, func() error {
		if o := l.one(); o.status != http.StatusOK || o.problem != "" {
			return fmt.Errorf("first generation: HTTP %d %s %v %s", o.status, o.message, o.clientErr, o.problem)
		}
		return nil
	})
	ready := time.Now()
	t.Logf("grid up in %v: %d NATS servers, registry, planner, router, settlement, %d executors", ready.Sub(began).Round(time.Millisecond), len(servers), executors)

	loadCtx, stopLoad := context.WithCancel(ctx)
	l.run(loadCtx)
	defer func() { stopLoad(); l.wg.Wait() }()
	const step = 8
	l.progress(t, step, 60*time.Second, "before any fault")

	// 1. The NATS server the router is connected to.
	var victim *natsServer
	var carried []string
	for _, s := range servers {
		names, err := s.clients()
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(names, "tessera-router") {
			victim, carried = s, names
		}
	}
	if victim == nil {
		t.Fatal("no server has the router's connection")
	}
	usage, err := admin.JS.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	leader := ""
	if info, err := usage.Info(ctx); err == nil && info.Cluster != nil {
		leader = info.Cluster.Leader
	}
	natsKill := time.Now()
	victim.Kill()
	t.Logf("KILLED %s (SIGKILL) %v into the load: it carried %d client connections (%s); stream USAGE's leader was %s", victim.name, natsKill.Sub(ready).Round(time.Millisecond), len(carried), strings.Join(carried, ", "), leader)
	bustest.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		for _, s := range servers {
			if s == victim {
				continue
			}
			if names, err := s.clients(); err == nil && slices.Contains(names, "tessera-router") {
				t.Logf("  the router reconnected to %s %v after the kill", s.name, time.Since(natsKill).Round(time.Millisecond))
				return nil
			}
		}
		return errors.New("the router has not reconnected")
	})
	l.progress(t, step, 90*time.Second, "with "+victim.name+" down")
	victim.Restart()
	victim.waitHealthy(t)
	bustest.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		info, err := usage.Info(ctx)
		if err != nil {
			return err
		}
		if info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			return fmt.Errorf("USAGE cluster %+v", info.Cluster)
		}
		for _, r := range info.Cluster.Replicas {
			if !r.Current || r.Offline {
				return fmt.Errorf("USAGE replica %s not current", r.Name)
			}
		}
		return nil
	})
	natsHealed := time.Now()
	t.Logf("RESTARTED %s: healthy, stream USAGE has 3 current replicas again (%v after the kill)", victim.name, natsHealed.Sub(natsKill).Round(time.Millisecond))
	l.progress(t, step, 60*time.Second, "after "+victim.name+" came back")

	// 2. An executor on the pipeline.
	killed := execs[1]
	execKill := time.Now()
	killed.Kill()
	t.Logf("KILLED %s (SIGKILL) %v into the load, in the middle of the pipeline", killed.Name(), execKill.Sub(ready).Round(time.Millisecond))
	waitPlan(executors-1, "re-plan without "+killed.Name())
	l.progress(t, step, 90*time.Second, "with "+killed.Name()+" down")
	killed.Restart()
	waitPlan(executors, killed.Name()+" back")
	execHealed := time.Now()
	t.Logf("RESTARTED %s with the same state directory (identity, usage spool): back in the plan %v after the kill", killed.Name(), execHealed.Sub(execKill).Round(time.Millisecond))
	l.progress(t, step, 90*time.Second, "after "+killed.Name()+" came back")

	// 3. Settlement, while usage keeps flowing in.
	lastSeq := func() uint64 {
		var seq uint64
		bustest.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
			info, err := usage.Info(ctx)
			if err != nil {
				return err
			}
			seq = info.State.LastSeq
			return nil
		})
		return seq
	}
	settleKill := time.Now()
	settlementProc.Kill()
	before := lastSeq()
	var settledAtKill uint64
	if err := ledger.QueryRow(ctx, "SELECT count() FROM "+database+".usage_events").Scan(&settledAtKill); err != nil {
		t.Fatal(err)
	}
	t.Logf("KILLED settlement (SIGKILL) %v into the load, at USAGE seq %d, with %d events in the ledger", settleKill.Sub(ready).Round(time.Millisecond), before, settledAtKill)
	l.progress(t, 4*step, 60*time.Second, "with settlement down")
	settlementProc.Restart()
	t.Logf("RESTARTED settlement %v after the kill; %d usage events arrived meanwhile", time.Since(settleKill).Round(time.Millisecond), lastSeq()-before)
	l.progress(t, step, 60*time.Second, "after settlement came back")

	stopLoad()
	l.wg.Wait()
	loadEnd := time.Now()

	// Every generation completed with the reference or failed clearly.
	var ok, failed, failoverOK int
	reasons := map[string]int{}
	for _, o := range l.outcomes {
		switch {
		case o.clientErr != nil:
			t.Errorf("a generation got no answer (started %v into the load): %v", o.start.Sub(ready).Round(time.Millisecond), o.clientErr)
		case o.problem != "":
			t.Errorf("generation %s: %s", o.id, o.problem)
		case o.status == http.StatusOK:
			ok++
			if o.failovers != "0" {
				failoverOK++
			}
		default:
			failed++
			reasons[fmt.Sprintf("HTTP %d %s", o.status, o.message)]++
		}
	}
	t.Logf("VERIFIED generations: %d in %v; %d completed with the reference's %d tokens (%d of them after a failover), %d failed with a clear error %v, 0 hung",
		len(l.outcomes), loadEnd.Sub(ready).Round(time.Millisecond), ok, maxTokens, failoverOK, failed, reasons)
	if ok == 0 {
		t.Fatal("no generation completed")
	}

	// The executors drain (SIGTERM): sessions still open publish their
	// usage, and nothing stays in a spool.
	for _, e := range execs {
		e.Stop()
	}
	spoolsEmpty := true
	for i, dir := range stateDirs {
		b, err := os.ReadFile(filepath.Join(dir, "usage.spool"))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if len(b) != 0 {
			spoolsEmpty = false
			t.Errorf("exec-%d left %d bytes in its usage spool: events never acknowledged\n%s", i+1, len(b), b)
		}
		for _, m := range replayed.FindAllStringSubmatch(execs[i].Log(), -1) {
			t.Logf("  exec-%d published %s events from its usage spool after a restart or a failed publish", i+1, m[1])
		}
	}
	if spoolsEmpty {
		t.Logf("VERIFIED usage spools: all %d executors stopped with empty spools (every event acknowledged by stream USAGE)", executors)
	}

	// The killed executor can only have lost the usage of generations it
	// took part in when it died: those running at the kill (or ending just
	// before it, their release not yet handled).
	verifyLedger(t, admin.JS, ledger, ready, l.outcomes, window{execKill.Add(-time.Second), execKill}, killed.Name())
	t.Logf("chaos test ran %v (grid up %v, load %v)", time.Since(began).Round(time.Millisecond), ready.Sub(began).Round(time.Millisecond), loadEnd.Sub(ready).Round(time.Millisecond))
}

// replayed finds an executor's log lines about events it published from
// its spool.
var replayed = regexp.MustCompile(`spooled usage re-published.* events=(\d+)`)

// row is one settled usage event as ClickHouse holds it.
type row struct {
	seq                                  uint64
	id, request, node, fragment          string
	prompt, generated, layerTokens, msgs int64
}

// verifyLedger checks, once settlement has caught up with stream USAGE,
// that the ledger holds every event of the stream exactly once (those
// settlement dead-lettered aside), and that every completed generation's
// usage is there: exactly for those that needed no failover and did not
// run while the executor was down, at least its tokens for the others.
func verifyLedger(t *testing.T, js jetstream.JetStream, conn driver.Conn, loadStart time.Time, outcomes []outcome, execDown window, execName string) {
	t.Helper()
	ctx := context.Background()
	stream, err := js.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	// Settled: every sequence is in the ledger or dead-lettered.
	var last uint64
	var dead map[uint64]string
	var rows map[uint64]row
	bustest.CheckFor(t, 90*time.Second, 200*time.Millisecond, func() error {
		info, err := stream.Info(ctx)
		if err != nil {
			return err
		}
		last = info.State.LastSeq
		if dead, err = deadLetters(ctx, js); err != nil {
			return err
		}
		if rows, err = ledgerRows(ctx, conn); err != nil {
			return err
		}
		if got := uint64(len(rows) + len(dead)); got < last {
			return fmt.Errorf("settled %d and dead-lettered %d of %d usage events", len(rows), len(dead), last)
		}
		return nil
	})

	// The stream's events, by sequence.
	events := map[uint64]wire.UsageEvent{}
	for seq := uint64(1); seq <= last; seq++ {
		m, err := stream.GetMsg(ctx, seq)
		if err != nil {
			t.Fatalf("USAGE seq %d: %v", seq, err)
		}
		var ev wire.UsageEvent
		if err := json.Unmarshal(m.Data, &ev); err != nil {
			t.Fatalf("USAGE seq %d: %v", seq, err)
		}
		events[seq] = ev
	}
	var count, ids, seqs uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(id), uniqExact(seq) FROM "+database+".usage_events").Scan(&count, &ids, &seqs); err != nil {
		t.Fatal(err)
	}
	if count != ids || count != seqs {
		t.Fatalf("ledger: %d rows, %d distinct event ids, %d distinct sequences: an event was settled twice", count, ids, seqs)
	}
	total := int(count)
	for seq, r := range rows {
		ev, ok := events[seq]
		if !ok {
			t.Fatalf("ledger row at seq %d, which stream USAGE does not hold (last %d)", seq, last)
		}
		if ev.ID != r.id {
			t.Fatalf("ledger row at seq %d is event %s, the stream's is %s", seq, r.id, ev.ID)
		}
		if _, isDead := dead[seq]; isDead {
			t.Fatalf("seq %d both settled and dead-lettered", seq)
		}
	}
	// A dead letter is only acceptable as a second copy of an event the
	// ledger holds: any other reason would be a usage event lost.
	settled := map[string]bool{}
	for _, r := range rows {
		settled[r.id] = true
	}
	byReason := map[string]int{}
	for seq, reason := range dead {
		ev, ok := events[seq]
		if !ok {
			t.Fatalf("dead letter for seq %d, which stream USAGE does not hold", seq)
		}
		if reason != settlement.ReasonDuplicate || !settled[ev.ID] {
			t.Errorf("USAGE seq %d (event %s) dead-lettered as %q, and its event is settled: %v", seq, ev.ID, reason, settled[ev.ID])
		}
		byReason[reason]++
	}
	if uint64(total) != last-uint64(len(dead)) {
		t.Fatalf("ledger holds %d events; stream USAGE %d minus %d dead-lettered = %d", total, last, len(dead), last-uint64(len(dead)))
	}
	t.Logf("VERIFIED ledger: %d rows = %d events in stream USAGE - %d dead-lettered %v; every event id once, every row the stream's event at its sequence, none lost",
		total, last, len(dead), byReason)

	// Each completed generation's usage.
	byRequest := map[string][]row{}
	for _, r := range rows {
		byRequest[r.request] = append(byRequest[r.request], r)
	}
	var exact, atLeast, duringKill int
	for _, o := range outcomes {
		if o.status != http.StatusOK || o.problem != "" {
			continue
		}
		rs := byRequest[o.id]
		seen := map[string]bool{}
		var prompt, generated, layerTokens int64
		for _, r := range rs {
			key := r.node + " " + r.fragment
			if seen[key] {
				t.Errorf("request %s: two events of %s", o.id, key)
			}
			seen[key] = true
			prompt += r.prompt
			generated += r.generated
			layerTokens += r.layerTokens
		}
		switch {
		case execDown.overlaps(o):
			// The killed executor's part of a generation it served when it
			// died was only in its memory.
			duringKill++
			if len(rs) == 0 {
				t.Errorf("request %s (running when %s was killed): no usage at all", o.id, execName)
			}
		case o.failovers == "0":
			exact++
			wantLayers := int64((promptTokens + maxTokens - 1) * layers)
			// Over whichever executors the plan of the moment spread it.
			if prompt != promptTokens || generated != maxTokens || layerTokens != wantLayers {
				var parts []string
				for _, r := range rs {
					parts = append(parts, fmt.Sprintf("%s %s: %d layer-tokens", r.node, r.fragment, r.layerTokens))
				}
				slices.Sort(parts)
				t.Errorf("request %s (%v to %v into the load): %d prompt, %d generated, %d layer-tokens (%s); want %d, %d, %d",
					o.id, o.start.Sub(loadStart).Round(time.Millisecond), o.end.Sub(loadStart).Round(time.Millisecond),
					prompt, generated, layerTokens, strings.Join(parts, "; "), promptTokens, maxTokens, wantLayers)
			}
		default:
			atLeast++
			if generated < maxTokens {
				t.Errorf("request %s (after %s failovers): %d generated tokens billed, want at least %d", o.id, o.failovers, generated, maxTokens)
			}
		}
	}
	t.Logf("VERIFIED usage per generation: %d without failover billed exactly (%d prompt + %d generated tokens, %d layer-tokens, no executor's event twice); %d after failovers billed at least their %d tokens; %d that ran when %s was killed have usage (its own part of those died with it)",
		exact, promptTokens, maxTokens, (promptTokens+maxTokens-1)*layers, atLeast, maxTokens, duringKill, execName)
	if exact == 0 {
		t.Error("no generation to check exactly")
	}
}

// promptTokens is the reference prompt's length in tokens (BOS included).
const promptTokens = 5

// ledgerRows reads every settled event.
func ledgerRows(ctx context.Context, conn driver.Conn) (map[uint64]row, error) {
	rs, err := conn.Query(ctx, "SELECT seq, id, request, node, fragment, prompt_tokens, generated_tokens, layer_tokens, messages FROM "+database+".usage_events")
	if err != nil {
		return nil, err
	}
	defer rs.Close()
	out := map[uint64]row{}
	for rs.Next() {
		var r row
		if err := rs.Scan(&r.seq, &r.id, &r.request, &r.node, &r.fragment, &r.prompt, &r.generated, &r.layerTokens, &r.msgs); err != nil {
			return nil, err
		}
		out[r.seq] = r
	}
	return out, rs.Err()
}

// deadLetters reads settlement's dead letters: the USAGE sequence of each,
// with its reason.
func deadLetters(ctx context.Context, js jetstream.JetStream) (map[uint64]string, error) {
	st, err := js.Stream(ctx, subjects.StreamDeadLetter)
	if err != nil {
		return nil, err
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(subjects.DeadLetter("settlement", "*")))
	if err != nil {
		return nil, err
	}
	out := map[uint64]string{}
	if info.State.Msgs == 0 {
		return out, nil
	}
	cons, err := js.OrderedConsumer(ctx, subjects.StreamDeadLetter, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subjects.DeadLetter("settlement", "*")}})
	if err != nil {
		return nil, err
	}
	for range info.State.Msgs {
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			return nil, err
		}
		var d wire.DeadLetter
		if err := json.Unmarshal(m.Data(), &d); err != nil {
			return nil, err
		}
		out[d.StreamSeq] = d.Reason
	}
	return out, nil
}
