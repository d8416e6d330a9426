package settlement_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
)

func httpJSON(t *testing.T, u string, v any) int {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode
}

func natsJSON(t *testing.T, g *grid, subject string, req, v any) {
	t.Helper()
	b, _ := json.Marshal(req)
	msg, err := g.conn.NC.Request(subject, b, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		t.Fatalf("%s: error %s %s", subject, code, msg.Header.Get(micro.ErrorHeader))
	}
	if err := json.Unmarshal(msg.Data, v); err != nil {
		t.Fatal(err)
	}
}

// A customer's statement equals the sum of its events' charges computed
// here, over NATS and over HTTP; a supplier's earnings likewise.
func TestStatementsEqualIndependentSums(t *testing.T) {
	g := newGrid(t, nil)
	g.cfg.HTTPAddr = freeAddr(t)
	gpu, cpu := newNode(t, "node-g", "gpu-co", "gpu"), newNode(t, "node-c", "cpu-co", "cpu")
	g.register(gpu)
	g.register(cpu)
	var all []wire.UsageEvent
	for h := 0; h < 4; h++ {
		end := t0.Add(time.Duration(h)*time.Hour + 17*time.Minute + 123*time.Microsecond)
		all = append(all, gpu.events(t, h*400, 400, []string{"acme", "globex"}, []string{"stories260k", "llama-7b"}, end)...)
		all = append(all, cpu.events(t, h*300, 300, []string{"acme", "initech"}, []string{"llama-7b"}, end.Add(time.Minute))...)
	}
	g.publish(all)
	g.start()
	g.waitSettled(int64(len(all)), 30*time.Second)

	// From inside hour 1 to exactly the end of an hour-2 event: that
	// event is excluded, [from, to).
	from, to := t0.Add(time.Hour), t0.Add(2*time.Hour+17*time.Minute+123*time.Microsecond)
	want := settlement.CustomerStatement{Customer: "acme", From: from, To: to}
	lines := map[string]*settlement.CustomerStatement{}
	var wantEarn settlement.SupplierStatement
	for i := range all {
		e := &all[i]
		if e.End.Before(from) || !e.End.Before(to) {
			continue
		}
		if e.Customer == "acme" {
			want.Total.Events++
			want.Total.PromptTokens += e.PromptTokens
			want.Total.GeneratedTokens += e.GeneratedTokens
			want.Total.ChargeMicros += charge(e)
			if lines[e.Model] == nil {
				lines[e.Model] = &settlement.CustomerStatement{}
			}
			lines[e.Model].Total.ChargeMicros += charge(e)
			lines[e.Model].Total.Events++
		}
		if e.Supplier == "gpu-co" {
			wantEarn.Total.Events++
			wantEarn.Total.LayerTokens += e.LayerTokens
			wantEarn.Total.ComputeUS += e.ComputeUS
			wantEarn.Total.EarningMicros += earning(e)
		}
	}
	if want.Total.ChargeMicros == 0 || wantEarn.Total.EarningMicros == 0 {
		t.Fatal("test data has nothing to bill")
	}
	check := func(via string, st settlement.CustomerStatement) {
		t.Helper()
		if st.Total != want.Total || st.Customer != "acme" || !st.From.Equal(from) || !st.To.Equal(to) {
			t.Fatalf("%s: statement %+v\nwant %+v", via, st, want)
		}
		var models []string
		for _, ln := range st.Lines {
			models = append(models, ln.Model)
			w := lines[ln.Model]
			if w == nil || ln.ChargeMicros != w.Total.ChargeMicros || ln.Events != w.Total.Events || len(ln.PriceVersions) != 1 || ln.PriceVersions[0] != 4 {
				t.Fatalf("%s: line %+v, want %+v", via, ln, w)
			}
		}
		if len(models) != len(lines) || !sort.StringsAreSorted(models) {
			t.Fatalf("%s: lines for %v, want %d models", via, models, len(lines))
		}
	}
	var viaNATS settlement.CustomerStatement
	natsJSON(t, g, subjects.SettlementCustomerStatement, settlement.CustomerStatementRequest{Customer: "acme", From: from, To: to}, &viaNATS)
	check("nats", viaNATS)
	q := url.Values{"from": {from.Format(time.RFC3339Nano)}, "to": {to.Format(time.RFC3339Nano)}}
	var viaHTTP settlement.CustomerStatement
	if code := httpJSON(t, "http://"+g.cfg.HTTPAddr+"/v1/customers/acme/statement?"+q.Encode(), &viaHTTP); code != 200 {
		t.Fatalf("http status %d", code)
	}
	check("http", viaHTTP)

	var earnNATS, earnHTTP settlement.SupplierStatement
	natsJSON(t, g, subjects.SettlementSupplierStatement, settlement.SupplierStatementRequest{Supplier: "gpu-co", From: from, To: to}, &earnNATS)
	httpJSON(t, "http://"+g.cfg.HTTPAddr+"/v1/suppliers/gpu-co/statement?"+q.Encode(), &earnHTTP)
	for _, got := range []settlement.SupplierStatement{earnNATS, earnHTTP} {
		if got.Total != wantEarn.Total || len(got.Lines) != 1 || got.Lines[0].DeviceType != "gpu" {
			t.Fatalf("earnings %+v, want %+v", got, wantEarn.Total)
		}
	}

	// Bad requests are refused with a reason, over both.
	var errBody map[string]string
	if code := httpJSON(t, "http://"+g.cfg.HTTPAddr+"/v1/customers/acme/statement?from=yesterday&to=now", &errBody); code != 400 || errBody["error"] == "" {
		t.Fatalf("bad time: status %d, %v", code, errBody)
	}
	b, _ := json.Marshal(settlement.CustomerStatementRequest{Customer: "acme.*", From: from, To: to})
	msg, err := g.conn.NC.Request(subjects.SettlementCustomerStatement, b, 10*time.Second)
	if err != nil || msg.Header.Get(micro.ErrorCodeHeader) != "400" {
		t.Fatalf("customer acme.*: %v %v", err, msg.Header)
	}

	// The micro service answers discovery.
	var info micro.Info
	resp, err := g.conn.NC.Request("$SRV.INFO.settlement", nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(resp.Data, &info); err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, ep := range info.Endpoints {
		got[ep.Subject] = true
	}
	for _, s := range []string{subjects.SettlementCustomerStatement, subjects.SettlementSupplierStatement, subjects.SettlementCustomerConsumerAll} {
		if !got[s] {
			t.Fatalf("$SRV.INFO lacks %s: %+v", s, info.Endpoints)
		}
	}
	if _, err := g.conn.NC.Request("$SRV.PING.settlement", nil, 5*time.Second); err != nil {
		t.Fatalf("$SRV.PING: %v", err)
	}

	// One request's rows, as the CLI prints them.
	var wantRows []wire.UsageEvent
	for _, e := range all {
		if e.Request == "req-303" {
			wantRows = append(wantRows, e)
		}
	}
	rows, err := settlement.RequestUsage(context.Background(), g.cfg, "req-303")
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(wantRows) || len(rows) < 2 {
		t.Fatalf("%d rows for req-303, want %d", len(rows), len(wantRows))
	}
	for i, r := range rows {
		if i > 0 && r.Seq <= rows[i-1].Seq {
			t.Fatalf("rows not in sequence order: %+v", rows)
		}
		var match bool
		for _, e := range wantRows {
			match = match || (e.Node == r.Node && e.LayerTokens == r.LayerTokens && e.ComputeUS == r.ComputeUS && charge(&e) == r.ChargeMicros && earning(&e) == r.EarningMicros)
		}
		if !match {
			t.Fatalf("row %+v matches no published event", r)
		}
	}
}

// The price book in KV is followed as it changes: each row carries the
// version it was priced with.
func TestPriceBookFromKVIsVersioned(t *testing.T) {
	g := newGrid(t, nil)
	g.cfg.PriceFile = ""
	nd := newNode(t, "node-a", "gpu-co", "gpu")
	g.register(nd)
	ctx := context.Background()
	kv, err := g.conn.JS.KeyValue(ctx, subjects.BucketPrices)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.PutString(ctx, subjects.KeyPriceBook, priceBook); err != nil {
		t.Fatal(err)
	}
	first := nd.events(t, 0, 50, []string{"acme"}, []string{"stories260k"}, t0)
	g.publish(first)
	g.start()
	g.waitSettled(50, 30*time.Second)

	// Version 5 doubles every customer price.
	doubled := `{"version": 5, "currency": "USD",
	  "models": {"stories260k": {"prompt_per_1k_micros": 300, "generated_per_1k_micros": 1200}},
	  "devices": {"gpu": {"per_million_layer_tokens_micros": 40000, "per_gpu_second_micros": 250}}}`
	if _, err := kv.PutString(ctx, subjects.KeyPriceBook, `{"version": "broken"}`); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.PutString(ctx, subjects.KeyPriceBook, doubled); err != nil {
		t.Fatal(err)
	}
	// Probe until an event is priced with version 5.
	var want totals
	want.add(first...)
	wantCharge := want.ChargeMicros
	probe := 50
	checkFor(t, 20*time.Second, 10*time.Millisecond, func() error {
		ev := nd.events(t, probe, 1, []string{"acme"}, []string{"stories260k"}, t0)
		probe++
		g.publish(ev)
		g.waitSettled(int64(probe), 10*time.Second)
		st, err := g.ledger.CustomerStatement(ctx, "acme", t0.Add(-time.Hour), t0.Add(time.Hour))
		if err != nil {
			return err
		}
		if v := st.Lines[0].PriceVersions; v[len(v)-1] != 5 {
			wantCharge += charge(&ev[0])
			return fmt.Errorf("price versions %v", v)
		}
		wantCharge += (ev[0].PromptTokens*300 + ev[0].GeneratedTokens*1200 + 500) / 1000
		return nil
	})
	st, err := g.ledger.CustomerStatement(ctx, "acme", t0.Add(-time.Hour), t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(st.Lines[0].PriceVersions) != "[4 5]" {
		t.Fatalf("price versions %v, want [4 5]", st.Lines[0].PriceVersions)
	}
	if st.Total.ChargeMicros != wantCharge {
		t.Fatalf("charges %d, want %d", st.Total.ChargeMicros, wantCharge)
	}
}
