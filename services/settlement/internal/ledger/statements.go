package ledger

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// CustomerStatement is a customer's usage and charges for the events that
// ended in [From, To), per model.
type CustomerStatement struct {
	Customer string         `json:"customer"`
	From     time.Time      `json:"from"`
	To       time.Time      `json:"to"`
	Lines    []CustomerLine `json:"lines"`
	Total    CustomerTotals `json:"total"`
}

// CustomerTotals sums a customer's usage.
type CustomerTotals struct {
	Events          int64 `json:"events"`
	PromptTokens    int64 `json:"prompt_tokens"`
	GeneratedTokens int64 `json:"generated_tokens"`
	// ChargeMicros is in millionths of the price book's currency.
	ChargeMicros int64 `json:"charge_micros"`
}

// CustomerLine is one model's part of a customer statement.
type CustomerLine struct {
	Model string `json:"model"`
	CustomerTotals
	// PriceVersions lists the price book versions the charges used.
	PriceVersions []uint64 `json:"price_versions"`
}

// SupplierStatement is a supplier's earnings for the events that ended in
// [From, To), per device class.
type SupplierStatement struct {
	Supplier string         `json:"supplier"`
	From     time.Time      `json:"from"`
	To       time.Time      `json:"to"`
	Lines    []SupplierLine `json:"lines"`
	Total    SupplierTotals `json:"total"`
}

// SupplierTotals sums a supplier's work.
type SupplierTotals struct {
	Events      int64 `json:"events"`
	LayerTokens int64 `json:"layer_tokens"`
	ComputeUS   int64 `json:"compute_us"`
	// EarningMicros is in millionths of the price book's currency.
	EarningMicros int64 `json:"earning_micros"`
}

// SupplierLine is one device class's part of a supplier statement.
type SupplierLine struct {
	DeviceType string `json:"device_type"`
	SupplierTotals
	PriceVersions []uint64 `json:"price_versions"`
}

// timeFilter selects events by end time: end_time (seconds, in the sort
// key) narrows the scan, end_us decides exactly.
const timeFilter = `end_time >= toDateTime(?) AND end_time <= toDateTime(?) AND end_us >= ? AND end_us < ?`

func timeArgs(from, to time.Time) []any {
	return []any{from.Unix(), to.Unix(), from.UnixMicro(), to.UnixMicro()}
}

// CustomerStatement returns customer's statement for [from, to).
func (l *Ledger) CustomerStatement(ctx context.Context, customer string, from, to time.Time) (CustomerStatement, error) {
	st := CustomerStatement{Customer: customer, From: from.UTC(), To: to.UTC(), Lines: []CustomerLine{}}
	rows, err := l.conn.Query(ctx, l.sql(`SELECT model, toInt64(count()), sum(prompt_tokens), sum(generated_tokens), sum(charge_micros), groupUniqArray(price_version)
		FROM {db}.usage_events WHERE customer = ? AND `+timeFilter+` GROUP BY model ORDER BY model`),
		append([]any{customer}, timeArgs(from, to)...)...)
	if err != nil {
		return st, fmt.Errorf("clickhouse statement of %s: %w", customer, err)
	}
	defer rows.Close()
	for rows.Next() {
		var ln CustomerLine
		if err := rows.Scan(&ln.Model, &ln.Events, &ln.PromptTokens, &ln.GeneratedTokens, &ln.ChargeMicros, &ln.PriceVersions); err != nil {
			return st, fmt.Errorf("clickhouse statement of %s: %w", customer, err)
		}
		slices.Sort(ln.PriceVersions)
		st.Lines = append(st.Lines, ln)
		st.Total.Events += ln.Events
		st.Total.PromptTokens += ln.PromptTokens
		st.Total.GeneratedTokens += ln.GeneratedTokens
		st.Total.ChargeMicros += ln.ChargeMicros
	}
	if err := rows.Err(); err != nil {
		return st, fmt.Errorf("clickhouse statement of %s: %w", customer, err)
	}
	return st, nil
}

// SupplierStatement returns supplier's earnings for [from, to).
func (l *Ledger) SupplierStatement(ctx context.Context, supplier string, from, to time.Time) (SupplierStatement, error) {
	st := SupplierStatement{Supplier: supplier, From: from.UTC(), To: to.UTC(), Lines: []SupplierLine{}}
	rows, err := l.conn.Query(ctx, l.sql(`SELECT device_type, toInt64(count()), sum(layer_tokens), sum(compute_us), sum(earning_micros), groupUniqArray(price_version)
		FROM {db}.usage_events WHERE supplier = ? AND `+timeFilter+` GROUP BY device_type ORDER BY device_type`),
		append([]any{supplier}, timeArgs(from, to)...)...)
	if err != nil {
		return st, fmt.Errorf("clickhouse earnings of %s: %w", supplier, err)
	}
	defer rows.Close()
	for rows.Next() {
		var ln SupplierLine
		if err := rows.Scan(&ln.DeviceType, &ln.Events, &ln.LayerTokens, &ln.ComputeUS, &ln.EarningMicros, &ln.PriceVersions); err != nil {
			return st, fmt.Errorf("clickhouse earnings of %s: %w", supplier, err)
		}
		slices.Sort(ln.PriceVersions)
		st.Lines = append(st.Lines, ln)
		st.Total.Events += ln.Events
		st.Total.LayerTokens += ln.LayerTokens
		st.Total.ComputeUS += ln.ComputeUS
		st.Total.EarningMicros += ln.EarningMicros
	}
	if err := rows.Err(); err != nil {
		return st, fmt.Errorf("clickhouse earnings of %s: %w", supplier, err)
	}
	return st, nil
}

// HourlyModel is one hour of one model's usage, from the model rollup.
type HourlyModel struct {
	Hour            time.Time `json:"hour"`
	Model           string    `json:"model"`
	Events          int64     `json:"events"`
	PromptTokens    int64     `json:"prompt_tokens"`
	GeneratedTokens int64     `json:"generated_tokens"`
	LayerTokens     int64     `json:"layer_tokens"`
	ChargeMicros    int64     `json:"charge_micros"`
	EarningMicros   int64     `json:"earning_micros"`
}

// HourlyByModel returns the model rollup for the hours starting in
// [from, to), by hour and model.
func (l *Ledger) HourlyByModel(ctx context.Context, from, to time.Time) ([]HourlyModel, error) {
	rows, err := l.conn.Query(ctx, l.sql(`SELECT hour, model, toInt64(sum(events)), sum(prompt_tokens), sum(generated_tokens), sum(layer_tokens), sum(charge_micros), sum(earning_micros)
		FROM {db}.usage_hourly_model WHERE hour >= toDateTime(?) AND hour < toDateTime(?) GROUP BY hour, model ORDER BY hour, model`),
		from.Unix(), to.Unix())
	if err != nil {
		return nil, fmt.Errorf("clickhouse hourly usage: %w", err)
	}
	defer rows.Close()
	var out []HourlyModel
	for rows.Next() {
		var h HourlyModel
		if err := rows.Scan(&h.Hour, &h.Model, &h.Events, &h.PromptTokens, &h.GeneratedTokens, &h.LayerTokens, &h.ChargeMicros, &h.EarningMicros); err != nil {
			return nil, fmt.Errorf("clickhouse hourly usage: %w", err)
		}
		h.Hour = h.Hour.UTC()
		out = append(out, h)
	}
	return out, rows.Err()
}

// Totals sums a whole table for consistency checks: the raw events, or one
// rollup table (by name: usage_events, usage_hourly_customer, ...).
type Totals struct {
	Events, PromptTokens, GeneratedTokens, LayerTokens, ChargeMicros, EarningMicros int64
}

// TableTotals sums the usage columns table has (others stay 0).
func (l *Ledger) TableTotals(ctx context.Context, table string) (Totals, error) {
	var t Totals
	var q string
	switch table {
	case "usage_events":
		q = "SELECT toInt64(count()), sum(prompt_tokens), sum(generated_tokens), sum(layer_tokens), sum(charge_micros), sum(earning_micros) FROM {db}.usage_events"
	case "usage_hourly_customer":
		q = "SELECT toInt64(sum(events)), sum(prompt_tokens), sum(generated_tokens), sum(layer_tokens), sum(charge_micros), toInt64(0) FROM {db}.usage_hourly_customer"
	case "usage_hourly_supplier":
		q = "SELECT toInt64(sum(events)), toInt64(0), toInt64(0), sum(layer_tokens), toInt64(0), sum(earning_micros) FROM {db}.usage_hourly_supplier"
	case "usage_hourly_model":
		q = "SELECT toInt64(sum(events)), sum(prompt_tokens), sum(generated_tokens), sum(layer_tokens), sum(charge_micros), sum(earning_micros) FROM {db}.usage_hourly_model"
	default:
		return t, fmt.Errorf("no usage table %q", table)
	}
	if err := l.conn.QueryRow(ctx, l.sql(q)).Scan(&t.Events, &t.PromptTokens, &t.GeneratedTokens, &t.LayerTokens, &t.ChargeMicros, &t.EarningMicros); err != nil {
		return t, fmt.Errorf("clickhouse totals of %s: %w", table, err)
	}
	return t, nil
}

// DistinctSeqs counts distinct sequences and distinct event ids, which equal
// the row count when nothing is duplicated.
func (l *Ledger) DistinctSeqs(ctx context.Context) (rows, seqs, ids uint64, err error) {
	err = l.conn.QueryRow(ctx, l.sql("SELECT count(), uniqExact(seq), uniqExact(id) FROM {db}.usage_events")).Scan(&rows, &seqs, &ids)
	if err != nil {
		err = fmt.Errorf("clickhouse distinct: %w", err)
	}
	return rows, seqs, ids, err
}

// EventRow is one stored event, as `tessera run` prints a request's usage.
type EventRow struct {
	Seq                                                                                uint64
	Node, Fragment                                                                     string
	PromptTokens, GeneratedTokens, LayerTokens, ComputeUS, ChargeMicros, EarningMicros int64
}

// RequestRows returns the stored events of one request in sequence order.
func (l *Ledger) RequestRows(ctx context.Context, request string) ([]EventRow, error) {
	rows, err := l.conn.Query(ctx, l.sql(`SELECT seq, node, fragment, prompt_tokens, generated_tokens, layer_tokens, compute_us, charge_micros, earning_micros
		FROM {db}.usage_events WHERE request = ? ORDER BY seq`), request)
	if err != nil {
		return nil, fmt.Errorf("clickhouse usage of request %s: %w", request, err)
	}
	defer rows.Close()
	var out []EventRow
	for rows.Next() {
		var r EventRow
		if err := rows.Scan(&r.Seq, &r.Node, &r.Fragment, &r.PromptTokens, &r.GeneratedTokens, &r.LayerTokens, &r.ComputeUS, &r.ChargeMicros, &r.EarningMicros); err != nil {
			return nil, fmt.Errorf("clickhouse usage of request %s: %w", request, err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}
