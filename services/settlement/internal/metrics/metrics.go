// Package metrics counts what settlement does: events settled, duplicates
// skipped, dead letters by reason, insert failures and how far behind the
// stream the ledger is. The counters are served as JSON (Snapshot) and
// observed by OpenTelemetry (Register), so either a scraper of /metrics or
// an OTLP collector sees them.
package metrics

import (
	"context"
	"maps"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Settlement holds settlement's counters. The zero value is ready.
type Settlement struct {
	// Settled counts events stored in the ledger.
	Settled atomic.Int64
	// Duplicates counts redelivered events skipped because they were stored.
	Duplicates atomic.Int64
	// Unpriced counts events settled without a price for their model or
	// device class.
	Unpriced atomic.Int64
	// Batches counts inserts; InsertErrors failed ClickHouse attempts while
	// storing a batch (inserts, and the lookups of replayed event ids).
	Batches      atomic.Int64
	InsertErrors atomic.Int64
	// ConsumerResets counts restarts of delivery from the ledger position.
	ConsumerResets atomic.Int64
	// Position is the highest stream sequence handled (stored or
	// dead-lettered).
	Position atomic.Uint64
	// RollupPosition is the highest sequence in every rollup table.
	RollupPosition atomic.Uint64
	// LagEvents and lagSeconds say how far behind the stream the ledger is.
	LagEvents  atomic.Int64
	lagSeconds atomic.Uint64 // float64 bits
	// SignatureChecks reads the verifier's count of ed25519 checks.
	SignatureChecks func() int64

	mu   sync.Mutex
	dead map[string]int64
}

// DeadLettered counts one event dead-lettered for reason.
func (s *Settlement) DeadLettered(reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead == nil {
		s.dead = map[string]int64{}
	}
	s.dead[reason]++
}

// SetLagSeconds records how old the oldest unsettled event is.
func (s *Settlement) SetLagSeconds(v float64) { s.lagSeconds.Store(math.Float64bits(v)) }

// Snapshot is the counters at one moment, as served by /metrics.
type Snapshot struct {
	Time            time.Time        `json:"time"`
	Settled         int64            `json:"settled_events"`
	Duplicates      int64            `json:"duplicate_deliveries"`
	DeadLettered    map[string]int64 `json:"dead_lettered"`
	Unpriced        int64            `json:"unpriced_events"`
	Batches         int64            `json:"insert_batches"`
	InsertErrors    int64            `json:"insert_errors"`
	ConsumerResets  int64            `json:"consumer_resets"`
	Position        uint64           `json:"position_seq"`
	RollupPosition  uint64           `json:"rollup_position_seq"`
	LagEvents       int64            `json:"lag_events"`
	LagSeconds      float64          `json:"lag_seconds"`
	SignatureChecks int64            `json:"signature_checks"`
}

// Snapshot reads every counter.
func (s *Settlement) Snapshot() Snapshot {
	s.mu.Lock()
	dead := maps.Clone(s.dead)
	s.mu.Unlock()
	if dead == nil {
		dead = map[string]int64{}
	}
	sn := Snapshot{
		Time:           time.Now().UTC(),
		Settled:        s.Settled.Load(),
		Duplicates:     s.Duplicates.Load(),
		DeadLettered:   dead,
		Unpriced:       s.Unpriced.Load(),
		Batches:        s.Batches.Load(),
		InsertErrors:   s.InsertErrors.Load(),
		ConsumerResets: s.ConsumerResets.Load(),
		Position:       s.Position.Load(),
		RollupPosition: s.RollupPosition.Load(),
		LagEvents:      s.LagEvents.Load(),
		LagSeconds:     math.Float64frombits(s.lagSeconds.Load()),
	}
	if s.SignatureChecks != nil {
		sn.SignatureChecks = s.SignatureChecks()
	}
	return sn
}

// Register makes the counters observable through meter (names prefixed
// "settlement."); the registration ends with the returned function.
func (s *Settlement) Register(meter metric.Meter) (func() error, error) {
	settled, err := meter.Int64ObservableCounter("settlement.events.settled", metric.WithDescription("usage events stored in ClickHouse"))
	if err != nil {
		return nil, err
	}
	dups, err := meter.Int64ObservableCounter("settlement.events.duplicate", metric.WithDescription("redelivered events skipped"))
	if err != nil {
		return nil, err
	}
	dead, err := meter.Int64ObservableCounter("settlement.events.dead_lettered", metric.WithDescription("events dead-lettered, by reason"))
	if err != nil {
		return nil, err
	}
	insertErrs, err := meter.Int64ObservableCounter("settlement.insert.errors", metric.WithDescription("failed ClickHouse attempts while storing batches"))
	if err != nil {
		return nil, err
	}
	lagEvents, err := meter.Int64ObservableGauge("settlement.lag.events", metric.WithDescription("events in stream USAGE not yet settled"))
	if err != nil {
		return nil, err
	}
	lagSeconds, err := meter.Float64ObservableGauge("settlement.lag.seconds", metric.WithUnit("s"), metric.WithDescription("age of the oldest unsettled event"))
	if err != nil {
		return nil, err
	}
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		sn := s.Snapshot()
		o.ObserveInt64(settled, sn.Settled)
		o.ObserveInt64(dups, sn.Duplicates)
		for reason, n := range sn.DeadLettered {
			o.ObserveInt64(dead, n, metric.WithAttributes(attribute.String("reason", reason)))
		}
		o.ObserveInt64(insertErrs, sn.InsertErrors)
		o.ObserveInt64(lagEvents, sn.LagEvents)
		o.ObserveFloat64(lagSeconds, sn.LagSeconds)
		return nil
	}, settled, dups, dead, insertErrs, lagEvents, lagSeconds)
	if err != nil {
		return nil, err
	}
	return reg.Unregister, nil
}
