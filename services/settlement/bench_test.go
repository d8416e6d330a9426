package settlement_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// ledgerColumns are the columns settlement writes, for the bulk-insert
// ceiling.
const ledgerColumns = `seq, id, request, customer, supplier, node, model, fragment, device_type, prompt_tokens, generated_tokens,
	layer_tokens, messages, flops, compute_us, start_us, end_us, end_time, public_key, price_version, charge_micros, earning_micros, settled_at`

// BenchmarkSettle measures sustained settlement: b.N signed events wait in
// stream USAGE, and the clock runs from settlement's start until the last
// of them is in ClickHouse, verified (registered key, batch signature),
// priced and rolled up. Then, for the same rows, it measures ClickHouse's
// own bulk insert (clickhouse-client reading a TSV file) as the ceiling.
// "all" also republishes every event to its customer's stream (the
// default); "ledger" does not.
//
//	go test ./services/settlement -run '^$' -bench BenchmarkSettle -benchtime 200000x
func BenchmarkSettle(b *testing.B) {
	b.Run("all", func(b *testing.B) { benchmarkSettle(b, true, "settlement_events_per_s", "clickhouse_bulk_rows_per_s") })
	b.Run("ledger", func(b *testing.B) { benchmarkSettle(b, false, "settlement_ledger_only_events_per_s", "") })
}

func benchmarkSettle(b *testing.B, customerStreams bool, figure, bulkFigure string) {
	g := newGrid(b, nil)
	g.cfg.BatchRows = 20000
	g.cfg.BatchWait = 200 * time.Millisecond
	g.cfg.RollupInterval = 2 * time.Second
	g.cfg.CustomerStreams = customerStreams
	nodes := []node{newNode(b, "node-a", "gpu-co", "gpu"), newNode(b, "node-b", "cpu-co", "cpu")}
	for _, nd := range nodes {
		g.register(nd)
	}
	n := b.N
	var evs []wire.UsageEvent
	ended := time.Now().UTC().Add(-time.Minute)
	for i := 0; len(evs) < n; i++ {
		k := min(5000, n-len(evs))
		// Events that ended just before they were published, as executors
		// publish them: late ones are also looked up in the ledger by id.
		evs = append(evs, nodes[i%2].events(b, len(evs), k, []string{"acme", "globex", "initech"}, []string{"stories260k", "llama-7b"}, ended.Add(time.Duration(i)*time.Second))...)
	}
	for i := 0; i < n; i += 10000 {
		g.publish(evs[i:min(i+10000, n)])
	}
	evs = nil
	ctx := context.Background()

	b.ResetTimer()
	start := time.Now()
	g.start()
	checkFor(b, 10*time.Minute, 5*time.Millisecond, func() error {
		pos, err := g.ledger.MaxSeq(ctx)
		if err != nil {
			return err
		}
		if pos != uint64(n) {
			return fmt.Errorf("position %d of %d", pos, n)
		}
		return nil
	})
	elapsed := time.Since(start)
	b.StopTimer()
	g.stop()
	settled := float64(n) / elapsed.Seconds()
	b.ReportMetric(settled, "events/s")
	figures := map[string]float64{figure: settled}
	if bulkFigure != "" {
		bulk, err := bulkInsertRate(g, n)
		if err != nil {
			b.Fatalf("bulk-insert ceiling: %v", err)
		}
		b.ReportMetric(bulk, "bulk_rows/s")
		b.ReportMetric(settled/bulk, "ratio")
		figures[bulkFigure] = bulk
	}
	if n > 1 {
		if err := benchfig.Record(figures); err != nil {
			b.Fatal(err)
		}
	}
}

// bulkInsertRate exports the settled rows to a TSV file and times
// clickhouse-client inserting them into an empty copy of the table.
func bulkInsertRate(g *grid, n int) (float64, error) {
	client, err := exec.LookPath("clickhouse-client")
	if err != nil {
		return 0, err
	}
	port := fmt.Sprint(g.ch.Port)
	run := func(query string, stdin, stdout *os.File) error {
		cmd := exec.Command(client, "--host", "127.0.0.1", "--port", port, "--query", query)
		cmd.Stdin, cmd.Stdout = stdin, stdout
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s: %v: %s", query, err, stderr.String())
		}
		return nil
	}
	path := filepath.Join(os.TempDir(), fmt.Sprintf("tessera-bulk-%d.tsv", time.Now().UnixNano()))
	defer os.Remove(path)
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if err := run(fmt.Sprintf("SELECT %s FROM %s.usage_events FORMAT TabSeparated", ledgerColumns, g.db), nil, f); err != nil {
		return 0, err
	}
	if err := run(fmt.Sprintf("CREATE TABLE %s.bulk AS %s.usage_events", g.db, g.db), nil, nil); err != nil {
		return 0, err
	}
	if _, err := f.Seek(0, 0); err != nil {
		return 0, err
	}
	start := time.Now()
	if err := run(fmt.Sprintf("INSERT INTO %s.bulk (%s) FORMAT TabSeparated", g.db, ledgerColumns), f, nil); err != nil {
		return 0, err
	}
	return float64(n) / time.Since(start).Seconds(), nil
}
