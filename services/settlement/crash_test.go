package settlement_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
	"github.com/tessera-grid/tessera/services/settlement/internal/clickhousetest"
)

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func getMetrics(t testing.TB, addr string) settlement.Metrics {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m settlement.Metrics
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

// While ClickHouse is away settlement stops consuming, acknowledges
// nothing it has not stored, reports its lag, and catches up when
// ClickHouse is back.
func TestClickHouseOutageStopsAndCatchesUp(t *testing.T) {
	ch := clickhousetest.StartOwn(t)
	g := newGrid(t, ch)
	g.cfg.HTTPAddr = freeAddr(t)
	nd := newNode(t, "node-a", "gpu-co", "gpu")
	g.register(nd)
	var want totals
	before := nd.events(t, 0, 2000, []string{"acme", "globex"}, []string{"stories260k"}, t0)
	want.add(before...)
	g.publish(before)
	g.start()
	g.waitSettled(want.Events, 30*time.Second)

	if err := ch.Kill(); err != nil {
		t.Fatal(err)
	}
	during := nd.events(t, 2000, 3000, []string{"acme"}, []string{"llama-7b"}, t0.Add(time.Hour))
	want.add(during...)
	g.publish(during)
	checkFor(t, 20*time.Second, 50*time.Millisecond, func() error {
		m := getMetrics(t, g.cfg.HTTPAddr)
		if m.LagEvents != 3000 || m.LagSeconds <= 0 || m.InsertErrors == 0 {
			return fmt.Errorf("lag %d events, %.3fs, %d insert errors", m.LagEvents, m.LagSeconds, m.InsertErrors)
		}
		return nil
	})
	if floor := g.usageConsumerInfo().AckFloor.Stream; floor > 2000 {
		t.Fatalf("ack floor %d while ClickHouse is down: acknowledged events that are not stored", floor)
	}
	if err := ch.Restart(); err != nil {
		t.Fatal(err)
	}
	g.waitSettled(want.Events, 60*time.Second)
	g.checkLedger(want)
	checkFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		if m := getMetrics(t, g.cfg.HTTPAddr); m.LagEvents != 0 || m.LagSeconds != 0 {
			return fmt.Errorf("lag %d events, %.3fs after catching up", m.LagEvents, m.LagSeconds)
		}
		return nil
	})
}

// buildSettlement builds the tessera-settlement binary.
func buildSettlement(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "tessera-settlement")
	out, err := exec.Command("go", "build", "-o", bin, "./cmd/tessera-settlement").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// process starts the binary against g's NATS server and database.
func (g *grid) process(bin string, logs io.Writer) *exec.Cmd {
	g.t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(),
		"NATS_URL="+g.ns.ClientURL(),
		settlement.EnvPrefix+"CLICKHOUSE_ADDR="+strings.Join(g.cfg.ClickHouseAddr, ","),
		settlement.EnvPrefix+"CLICKHOUSE_DATABASE="+g.cfg.ClickHouseDatabase,
		settlement.EnvPrefix+"PRICE_FILE="+g.cfg.PriceFile,
		settlement.EnvPrefix+"BATCH_ROWS="+fmt.Sprint(g.cfg.BatchRows),
		settlement.EnvPrefix+"BATCH_WAIT="+g.cfg.BatchWait.String(),
		settlement.EnvPrefix+"RETRY_MAX="+g.cfg.RetryMax.String(),
		settlement.EnvPrefix+"ROLLUP_INTERVAL="+g.cfg.RollupInterval.String(),
	)
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		g.t.Fatal(err)
	}
	return cmd
}

func (g *grid) settledCount() int64 {
	tt, err := g.ledger.TableTotals(context.Background(), "usage_events")
	if err != nil {
		return -1
	}
	return tt.Events
}

// The acceptance test: 100,000 events flow while settlement is stopped at
// random points (its context cancelled mid-batch, mid-insert, mid-ack),
// killed with SIGKILL as a separate process, and ClickHouse is killed and
// restarted once. Afterwards the ledger holds exactly what was published.
func TestCrashAtRandomPointsLosesAndDuplicatesNothing(t *testing.T) {
	ch := clickhousetest.StartOwn(t)
	bin := buildSettlement(t)
	g := newGrid(t, ch)
	g.cfg.BatchRows = 1000
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	nodes := []node{
		newNode(t, "node-a", "gpu-co", "gpu"), newNode(t, "node-b", "gpu-co", "gpu"),
		newNode(t, "node-c", "cpu-co", "cpu"), newNode(t, "node-d", "cpu-co", "cpu"),
	}
	for _, nd := range nodes {
		g.register(nd)
	}
	const total, chunk = 100_000, 2_000
	var all []wire.UsageEvent
	for i := 0; len(all) < total; i++ {
		nd := nodes[i%len(nodes)]
		all = append(all, nd.events(t, i*chunk, chunk, []string{"acme", "globex", "initech"}, []string{"stories260k", "llama-7b"}, t0.Add(time.Duration(i)*time.Minute))...)
	}
	var want totals
	want.add(all...)

	published := make(chan error, 1)
	go func() {
		for i := 0; i < total; i += chunk {
			if err := g.tryPublish(all[i : i+chunk]); err != nil {
				published <- err
				return
			}
			time.Sleep(time.Duration(i%37) * time.Millisecond)
		}
		published <- nil
	}()

	pause := func(lo, hi int) { time.Sleep(time.Duration(lo+rng.IntN(hi-lo)) * time.Millisecond) }
	// progress waits until something more is settled, so that every stop
	// falls in the middle of the flow.
	progress := func(from int64) {
		checkFor(t, 60*time.Second, 5*time.Millisecond, func() error {
			if n := g.settledCount(); n <= from && n < total {
				return fmt.Errorf("nothing settled beyond %d", from)
			}
			return nil
		})
	}
	var logs bytes.Buffer
	for round := 0; round < 9; round++ {
		from := max(0, g.settledCount())
		switch round {
		case 3, 6: // a separate process, killed without warning
			cmd := g.process(bin, &logs)
			progress(from)
			pause(0, 300)
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			_ = cmd.Wait()
		case 4: // ClickHouse dies under a running settlement and comes back
			g.start()
			progress(from)
			pause(0, 200)
			if err := ch.Kill(); err != nil {
				t.Fatal(err)
			}
			pause(100, 500)
			if err := ch.Restart(); err != nil {
				t.Fatal(err)
			}
			progress(g.settledCount())
			g.stop()
		default: // shut down at a random point
			g.start()
			progress(from)
			pause(0, 300)
			g.stop()
		}
		t.Logf("round %d: %d events settled", round, g.settledCount())
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	g.start()
	g.waitSettled(total, 120*time.Second)
	g.checkLedger(want)
	// Every event reached its customer's stream once.
	stream, err := g.conn.JS.Stream(context.Background(), subjects.StreamCustomerUsage)
	if err != nil {
		t.Fatal(err)
	}
	if n := stream.CachedInfo().State.Msgs; n != total {
		t.Fatalf("customer streams hold %d events, want %d", n, total)
	}
	if t.Failed() {
		t.Logf("binary logs:\n%s", logs.String())
	}
}
