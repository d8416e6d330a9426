package registry

import (
	"context"
	"maps"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// metrics counts what the registry did, both as OpenTelemetry instruments
// and as plain counters for the stats endpoint.
type metrics struct {
	received atomic.Uint64
	accepted atomic.Uint64
	writes   atomic.Uint64
	passed   atomic.Uint64
	failed   atomic.Uint64
	// pending reports heartbeats received but not yet checked.
	pending func() int

	mu       sync.Mutex
	refused  map[string]uint64
	otelAcc  metric.Int64Counter
	otelRej  metric.Int64Counter
	otelChal metric.Int64Counter
}

func newMetrics() (*metrics, error) {
	m := &metrics{refused: map[string]uint64{}, pending: func() int { return 0 }}
	meter := otel.Meter("tessera/registry")
	var err error
	if m.otelAcc, err = meter.Int64Counter("tessera.registry.heartbeats.accepted", metric.WithDescription("heartbeats that updated a node")); err != nil {
		return nil, err
	}
	if m.otelRej, err = meter.Int64Counter("tessera.registry.heartbeats.rejected", metric.WithDescription("heartbeats refused, by reason")); err != nil {
		return nil, err
	}
	if m.otelChal, err = meter.Int64Counter("tessera.registry.challenges", metric.WithDescription("node challenges, by outcome")); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *metrics) accept(ctx context.Context) {
	m.accepted.Add(1)
	m.otelAcc.Add(ctx, 1)
}

func (m *metrics) rejected(ctx context.Context, reason string) {
	m.mu.Lock()
	m.refused[reason]++
	m.mu.Unlock()
	m.otelRej.Add(ctx, 1, metric.WithAttributes(attribute.String("reason", reason)))
}

func (m *metrics) challenge(ctx context.Context, passed bool) {
	outcome := "failed"
	if passed {
		outcome = "passed"
		m.passed.Add(1)
	} else {
		m.failed.Add(1)
	}
	m.otelChal.Add(ctx, 1, metric.WithAttributes(attribute.String("outcome", outcome)))
}

// Stats returns the registry's counters and the live nodes by state.
func (r *Registry) Stats() wire.RegistryStats {
	m := r.metrics
	s := wire.RegistryStats{
		ByState:            map[string]int{},
		HeartbeatsReceived: m.received.Load(),
		HeartbeatsAccepted: m.accepted.Load(),
		Pending:            m.pending(),
		RecordWrites:       m.writes.Load(),
		ChallengesPassed:   m.passed.Load(),
		ChallengesFailed:   m.failed.Load(),
	}
	m.mu.Lock()
	s.Rejected = maps.Clone(m.refused)
	m.mu.Unlock()
	r.mu.Lock()
	s.Nodes = len(r.nodes)
	for _, e := range r.nodes {
		s.ByState[e.rec.State]++
	}
	r.mu.Unlock()
	return s
}
