package ledger

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement/internal/clickhousetest"
)

var server *clickhousetest.Server

func TestMain(m *testing.M) { os.Exit(clickhousetest.Main(m, &server)) }

func newLedger(t *testing.T) *Ledger {
	t.Helper()
	srv := clickhousetest.Require(t, server)
	l, err := Open(Options{Addr: []string{srv.Addr()}, Database: srv.Database(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	if err := l.Migrate(context.Background()); err != nil {
		t.Fatal(err)
	}
	return l
}

var t0 = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)

// rows makes n rows from seq first on, spread over customers, suppliers,
// models and hours, with charges and earnings derived from the seq.
func rows(first uint64, n int) []Row {
	out := make([]Row, n)
	for i := range out {
		seq := first + uint64(i)
		end := t0.Add(time.Duration(seq) * 7 * time.Minute).Add(123456 * time.Microsecond)
		out[i] = Row{
			Seq: seq,
			Event: &wire.UsageEvent{
				ID: fmt.Sprintf("ev-%d", seq), Request: fmt.Sprintf("req-%d", seq/3),
				Customer: []string{"acme", "globex", "initech"}[seq%3], Supplier: []string{"s1", "s2"}[seq%2],
				Node: fmt.Sprintf("node-%d", seq%4), Model: []string{"m1", "m2"}[seq/2%2], Fragment: "layers[0,5)",
				PromptTokens: int64(seq % 50), GeneratedTokens: int64(seq % 17), LayerTokens: int64(5 * seq), Messages: 2,
				FLOPs: int64(1000 * seq), DeviceType: []string{"cpu", "gpu"}[seq%2], ComputeUS: int64(100 + seq),
				Start: end.Add(-time.Second), End: end, PublicKey: "UKEY",
			},
			PriceVersion: 1 + seq%2, ChargeMicros: int64(seq * 3), EarningMicros: int64(seq * 2),
		}
	}
	return out
}

func TestMigrateIsVersionedAndIdempotent(t *testing.T) {
	l := newLedger(t)
	ctx := context.Background()
	if err := l.Migrate(ctx); err != nil {
		t.Fatalf("second migrate: %v", err)
	}
	v, err := l.Version(ctx)
	if err != nil || v != LatestVersion() {
		t.Fatalf("version %d, %v; want %d", v, err, LatestVersion())
	}
	var applied uint64
	if err := l.conn.QueryRow(ctx, l.sql("SELECT count() FROM {db}.schema_migrations")).Scan(&applied); err != nil {
		t.Fatal(err)
	}
	if applied != uint64(len(migrations)) {
		t.Fatalf("%d migrations recorded after two runs, want %d", applied, len(migrations))
	}
	if _, err := Open(Options{Addr: []string{"x:1"}, Database: "bad-name"}); !errors.Is(err, ErrConfig) {
		t.Fatalf("bad database name: %v", err)
	}
}

func TestInsertAndMaxSeq(t *testing.T) {
	l := newLedger(t)
	ctx := context.Background()
	if seq, err := l.MaxSeq(ctx); err != nil || seq != 0 {
		t.Fatalf("empty ledger: max seq %d, %v", seq, err)
	}
	if err := l.Insert(ctx, rows(1, 100), time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := l.Insert(ctx, rows(101, 50), time.Now()); err != nil {
		t.Fatal(err)
	}
	if seq, err := l.MaxSeq(ctx); err != nil || seq != 150 {
		t.Fatalf("max seq %d, %v; want 150", seq, err)
	}
	n, seqs, ids, err := l.DistinctSeqs(ctx)
	if err != nil || n != 150 || seqs != 150 || ids != 150 {
		t.Fatalf("rows %d, seqs %d, ids %d, %v", n, seqs, ids, err)
	}
	// Timestamps keep microseconds.
	var endUS int64
	if err := l.conn.QueryRow(ctx, l.sql("SELECT end_us FROM {db}.usage_events WHERE seq = 7")).Scan(&endUS); err != nil {
		t.Fatal(err)
	}
	if want := rows(7, 1)[0].Event.End.UnixMicro(); endUS != want {
		t.Fatalf("end_us %d, want %d", endUS, want)
	}
}

func TestStatementsMatchIndependentSums(t *testing.T) {
	l := newLedger(t)
	ctx := context.Background()
	all := rows(1, 300)
	if err := l.Insert(ctx, all, time.Now()); err != nil {
		t.Fatal(err)
	}
	from, to := all[40].Event.End, all[250].Event.End // [from, to): row 250 excluded
	var want CustomerTotals
	perModel := map[string]int64{}
	var wantSup SupplierTotals
	for _, r := range all {
		e := r.Event
		if e.End.Before(from) || !e.End.Before(to) {
			continue
		}
		if e.Customer == "globex" {
			want.Events++
			want.PromptTokens += e.PromptTokens
			want.GeneratedTokens += e.GeneratedTokens
			want.ChargeMicros += r.ChargeMicros
			perModel[e.Model] += r.ChargeMicros
		}
		if e.Supplier == "s2" {
			wantSup.Events++
			wantSup.LayerTokens += e.LayerTokens
			wantSup.ComputeUS += e.ComputeUS
			wantSup.EarningMicros += r.EarningMicros
		}
	}
	st, err := l.CustomerStatement(ctx, "globex", from, to)
	if err != nil {
		t.Fatal(err)
	}
	if st.Total != want || want.Events == 0 {
		t.Fatalf("statement totals %+v, want %+v", st.Total, want)
	}
	for _, ln := range st.Lines {
		if perModel[ln.Model] != ln.ChargeMicros || len(ln.PriceVersions) == 0 {
			t.Fatalf("line %+v, want charge %d", ln, perModel[ln.Model])
		}
	}
	sup, err := l.SupplierStatement(ctx, "s2", from, to)
	if err != nil {
		t.Fatal(err)
	}
	if sup.Total != wantSup || wantSup.Events == 0 {
		t.Fatalf("supplier totals %+v, want %+v", sup.Total, wantSup)
	}
	none, err := l.CustomerStatement(ctx, "nobody", from, to)
	if err != nil || none.Total.Events != 0 || none.Lines == nil {
		t.Fatalf("unknown customer: %+v, %v", none, err)
	}
}

func TestRollupAppliesEachEventOnce(t *testing.T) {
	l := newLedger(t)
	ctx := context.Background()
	raw := func() Totals {
		tt, err := l.TableTotals(ctx, "usage_events")
		if err != nil {
			t.Fatal(err)
		}
		return tt
	}
	check := func(upTo uint64) {
		t.Helper()
		want := raw()
		for _, table := range []string{"usage_hourly_customer", "usage_hourly_model"} {
			got, err := l.TableTotals(ctx, table)
			if err != nil {
				t.Fatal(err)
			}
			if table == "usage_hourly_customer" {
				want.EarningMicros = 0
			} else {
				want.EarningMicros = raw().EarningMicros
			}
			if got != want {
				t.Fatalf("%s after rollup to %d: %+v, raw %+v", table, upTo, got, want)
			}
		}
		sup, err := l.TableTotals(ctx, "usage_hourly_supplier")
		if err != nil {
			t.Fatal(err)
		}
		if sup.Events != want.Events || sup.LayerTokens != want.LayerTokens || sup.EarningMicros != raw().EarningMicros {
			t.Fatalf("supplier rollup %+v, raw %+v", sup, raw())
		}
		if p, err := l.RollupPosition(ctx); err != nil || p != upTo {
			t.Fatalf("rollup position %d, %v; want %d", p, err, upTo)
		}
	}
	if err := l.Insert(ctx, rows(1, 200), time.Now()); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ { // repeated steps change nothing
		if err := l.Rollup(ctx, 200); err != nil {
			t.Fatal(err)
		}
	}
	check(200)
	if err := l.Insert(ctx, rows(201, 77), time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := l.Rollup(ctx, 277); err != nil {
		t.Fatal(err)
	}
	// Merges sum rows and keep the highest position.
	for _, r := range rollups {
		if err := l.conn.Exec(ctx, l.sql("OPTIMIZE TABLE {db}."+r.table+" FINAL")); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Rollup(ctx, 277); err != nil {
		t.Fatal(err)
	}
	check(277)
	hours, err := l.HourlyByModel(ctx, t0, t0.Add(48*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	var events int64
	for _, h := range hours {
		if h.Hour.Minute() != 0 || h.Hour.Second() != 0 {
			t.Fatalf("hour %v not aligned", h.Hour)
		}
		events += h.Events
	}
	if events != 277 {
		t.Fatalf("hourly model rollup holds %d events, want 277", events)
	}
}

func TestNodeKeys(t *testing.T) {
	l := newLedger(t)
	ctx := context.Background()
	for _, k := range [][2]string{{"n1", "UA"}, {"n1", "UB"}, {"n2", "UC"}, {"n1", "UA"}} {
		if err := l.SaveNodeKey(ctx, k[0], k[1], time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := l.NodeKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys["n1"]) != 2 || len(keys["n2"]) != 1 || keys["n2"][0] != "UC" {
		t.Fatalf("keys %v", keys)
	}
}

// An insert still running (here a slow query under an insert's id) is
// killed, and FinishInserts returns only once it has ended.
func TestFinishInsertsEndsRunningInserts(t *testing.T) {
	l := newLedger(t)
	ctx := context.Background()
	if err := l.FinishInserts(ctx); err != nil {
		t.Fatalf("nothing running: %v", err)
	}
	ended := make(chan error, 1)
	go func() {
		// 0.1 s per one-row block: ten minutes unless killed.
		qctx := clickhouse.Context(ctx, clickhouse.WithQueryID(l.queryID(l.insertPrefix)),
			clickhouse.WithSettings(clickhouse.Settings{"max_block_size": 1}))
		ended <- l.conn.Exec(qctx, "SELECT sleepEachRow(0.1) FROM system.numbers LIMIT 6000 FORMAT Null")
	}()
	var running uint64
	for running == 0 {
		select {
		case err := <-ended:
			t.Fatalf("the slow query ended before it was seen running: %v", err)
		default:
		}
		if err := l.conn.QueryRow(ctx, "SELECT count() FROM system.processes WHERE startsWith(query_id, ?)", l.insertPrefix).Scan(&running); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.FinishInserts(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ended:
		if err == nil {
			t.Fatal("the running query completed instead of being killed")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("FinishInserts returned while the query still runs")
	}
}

// StoredIDs finds the stored events among many (more than one query's
// worth), and only events whose recorded fields match.
func TestStoredIDs(t *testing.T) {
	l := newLedger(t)
	ctx := context.Background()
	stored := rows(1, 2500)
	settled := stored[len(stored)-1].Event.End.Add(time.Minute)
	if err := l.Insert(ctx, stored, settled); err != nil {
		t.Fatal(err)
	}
	var events []*wire.UsageEvent
	for _, r := range rows(1, 2600) {
		events = append(events, r.Event)
	}
	moved := *events[10]
	moved.Customer = "someone-else"
	events = append(events, &moved)
	found, err := l.StoredIDs(ctx, events)
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 2500 {
		t.Fatalf("%d ids found, want 2500", len(found))
	}
	for _, r := range stored {
		if !found[r.Event.ID] {
			t.Fatalf("stored event %s not found", r.Event.ID)
		}
	}
	if found, err := l.StoredIDs(ctx, []*wire.UsageEvent{&moved}); err != nil || len(found) != 0 {
		t.Fatalf("event with another customer: found %v, %v", found, err)
	}
	if found, err := l.StoredIDs(ctx, nil); err != nil || len(found) != 0 {
		t.Fatalf("no events: %v, %v", found, err)
	}
}
