// Package settle moves usage events from stream USAGE into the ledger exactly
// once: verified, priced, republished to each customer's own subjects, and
// acknowledged only after their rows are in ClickHouse.
//
// How exactly-once works. Rows carry their USAGE sequence and the ledger's
// position is its highest stored sequence (ledger.MaxSeq); one insert is one
// ClickHouse part, all or nothing. A delivery session first ends any insert
// an earlier writer left running (ClickHouse completes an insert it has
// received even when its client died), reads the position, and recreates
// the durable consumer to deliver from position+1, in stream order. Events
// are handled strictly in sequence: a batch is verified and priced, its dead
// letters are published, it is republished to the customer streams,
// inserted (retried with back-off while ClickHouse is away, re-reading the
// position first, since a failed insert may have been written), and only
// then acknowledged (AckAll: one ack per batch). Verifying batch k+1
// overlaps storing batch k, but batches are stored in order. A redelivery at
// or below the position is a duplicate and is skipped; a gap in the
// delivered sequences, unless the missing events are gone from the stream,
// ends the session, and the next one starts again from the position. So a
// crash anywhere, or ClickHouse going away, neither loses nor duplicates a
// row: nothing in memory is acknowledged before it is stored.
//
// One settlement instance may write to a ledger database at a time.
package settle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement/internal/ledger"
	"github.com/tessera-grid/tessera/services/settlement/internal/metrics"
	"github.com/tessera-grid/tessera/services/settlement/internal/nodekeys"
	"github.com/tessera-grid/tessera/services/settlement/internal/prices"
)

// Service is the name settlement dead-letters under.
const Service = "settlement"

// Dead-letter reasons.
const (
	// ReasonMalformed: not a valid usage event (JSON, fields, encodings).
	ReasonMalformed = "malformed"
	// ReasonWrongSubject: published on another node's usage subject.
	ReasonWrongSubject = "wrong_subject"
	// ReasonUnknownNode: the registry never held a key for the node.
	ReasonUnknownNode = "unknown_node"
	// ReasonKeyMismatch: signed with a key the registry never held for the node.
	ReasonKeyMismatch = "key_mismatch"
	// ReasonBadSignature: the event was altered or its signature is forged.
	ReasonBadSignature = "bad_signature"
	// ReasonPriceOverflow: the event's counts are too large to price.
	ReasonPriceOverflow = "price_overflow"
	// ReasonDuplicate: an event with this id is settled already, at an
	// earlier sequence: the node published it again after the stream's
	// de-duplication window (a replay of its usage spool).
	ReasonDuplicate = "duplicate"
)

// TracerName is the instrumentation scope of settlement's spans.
const TracerName = "tessera/settlement"

// KeyResolver gives every public key the registry has held for a node; an
// error wrapping nodekeys.ErrUnknownNode means none. Other errors are
// treated as transient and retried.
type KeyResolver interface {
	NodeKeys(ctx context.Context, node string) ([]string, error)
}

// Config tunes the Settler.
type Config struct {
	// Consumer is the durable consumer's name on stream USAGE.
	Consumer string
	// BatchRows and BatchWait bound a batch: it is inserted when it holds
	// BatchRows events or BatchWait after its first event arrived.
	BatchRows int
	BatchWait time.Duration
	// AckWait is how long JetStream waits for an ack before redelivering.
	AckWait time.Duration
	// RetryMin and RetryMax bound the back-off between failed attempts.
	RetryMin, RetryMax time.Duration
	// CustomerStreams republishes settled events to each customer's subjects.
	CustomerStreams bool
	// RollupInterval is how often the hourly rollups catch up.
	RollupInterval time.Duration
	// LagInterval is how often the lag behind the stream is measured.
	LagInterval time.Duration
}

// Deps are what a Settler works with.
type Deps struct {
	// NC carries the customer-stream publishes; JS everything else.
	NC       *nats.Conn
	JS       jetstream.JetStream
	Ledger   *ledger.Ledger
	Keys     KeyResolver
	Prices   *prices.Current
	Verifier *usagesig.Verifier
	Metrics  *metrics.Settlement
	Log      *slog.Logger
}

// Settler runs delivery sessions until its context ends.
type Settler struct {
	cfg      Config
	js       jetstream.JetStream
	pub      jetstream.JetStream // its own async-publish window for customer streams
	ledger   *ledger.Ledger
	keys     KeyResolver
	prices   *prices.Current
	verifier *usagesig.Verifier
	m        *metrics.Settlement
	log      *slog.Logger

	// next is the next sequence to handle (only the reading goroutine
	// touches it); done is next after the last batch stored, dead-lettered
	// and acknowledged (only the writing goroutine, between sessions the
	// session's).
	next, done uint64
	// stored is the ledger's position as last known.
	stored atomic.Uint64
	// replayAge is how long after its end an event may reach the stream
	// before it is looked up in the ledger by id: half the stream's
	// de-duplication window (read at the start of each session), so that
	// every event the window could have missed is looked up, even from a
	// node whose clock is off by less than the other half.
	replayAge time.Duration
}

// Validate reports the first unusable setting.
func (cfg Config) Validate() error {
	if cfg.BatchRows < 1 || cfg.BatchWait <= 0 || cfg.RetryMin <= 0 || cfg.RetryMax < cfg.RetryMin || cfg.AckWait <= 0 || cfg.RollupInterval <= 0 || cfg.LagInterval <= 0 {
		return fmt.Errorf("settle: batch rows %d, batch wait %v, retry %v..%v, ack wait %v, rollup every %v, lag every %v: %w",
			cfg.BatchRows, cfg.BatchWait, cfg.RetryMin, cfg.RetryMax, cfg.AckWait, cfg.RollupInterval, cfg.LagInterval, ErrConfig)
	}
	if err := subjects.Token(cfg.Consumer); err != nil {
		return fmt.Errorf("settle: consumer name: %w: %w", err, ErrConfig)
	}
	return nil
}

// New returns a Settler.
func New(cfg Config, d Deps) (*Settler, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if d.NC == nil || d.JS == nil || d.Ledger == nil || d.Keys == nil || d.Prices == nil || d.Verifier == nil || d.Metrics == nil || d.Log == nil {
		return nil, fmt.Errorf("settle: missing dependency: %w", ErrConfig)
	}
	pub, err := jetstream.New(d.NC, jetstream.WithPublishAsyncMaxPending(max(4*cfg.BatchRows, 4096)))
	if err != nil {
		return nil, err
	}
	return &Settler{cfg: cfg, js: d.JS, pub: pub, ledger: d.Ledger, keys: d.Keys, prices: d.Prices, verifier: d.Verifier, m: d.Metrics, log: d.Log}, nil
}

// Run settles until ctx ends; it returns nil then. Failures (ClickHouse or
// NATS unavailable, a gap in delivery) end a session; the next one starts
// after a back-off from the ledger's position.
func (s *Settler) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); s.rollupLoop(ctx) }()
	go func() { defer wg.Done(); s.lagLoop(ctx) }()
	defer wg.Wait()
	delay := s.cfg.RetryMin
	for {
		started := time.Now()
		err := s.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		s.m.ConsumerResets.Add(1)
		if time.Since(started) > 10*s.cfg.RetryMax {
			delay = s.cfg.RetryMin // it ran well for a while: start the back-off afresh
		}
		s.log.Warn("settlement delivery restarts from the ledger position", "err", err, "in", delay)
		if !sleep(ctx, delay) {
			return nil
		}
		delay = min(2*delay, s.cfg.RetryMax)
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// session delivers from the ledger's position until an error. Two
// goroutines form a pipeline: this one collects, verifies and prices batch
// k+1 while write stores batch k, so that ClickHouse's insert work and ours
// overlap; batches are stored strictly in order.
func (s *Settler) session(ctx context.Context) error {
	pos, err := s.position(ctx)
	if err != nil {
		return err
	}
	s.stored.Store(pos)
	stream, err := s.js.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		return fmt.Errorf("stream %s: %w", subjects.StreamUsage, err)
	}
	s.replayAge = stream.CachedInfo().Config.Duplicates / 2
	s.next = max(pos+1, s.done)
	s.m.Position.Store(s.next - 1)
	cons, err := s.consumer(ctx, s.next)
	if err != nil {
		return err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2 * s.cfg.BatchRows))
	if err != nil {
		return fmt.Errorf("consume %s: %w", subjects.StreamUsage, err)
	}
	defer it.Stop()
	s.log.Info("settlement delivery starts", "from_seq", s.next, "consumer", s.cfg.Consumer)

	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	ready := make(chan *prepared, 1)
	written := make(chan error, 1)
	go func() {
		err := s.write(wctx, ready)
		cancel(err) // a failed write ends the reading too
		written <- err
	}()
	readErr := s.read(wctx, it, ready)
	close(ready)
	writeErr := <-written
	if writeErr != nil {
		return writeErr
	}
	return readErr
}

// prepared is a verified, priced batch, ready to be stored.
type prepared struct {
	rows []ledger.Row
	// about holds for each row its message and more.
	about []rowInfo
	dead  []deadLetter
	// last is the batch's message with the highest sequence: acknowledging
	// it acknowledges the batch (AckAll acknowledges by stream sequence).
	last    jetstream.Msg
	lastSeq uint64
	// next is the sequence to handle after this batch.
	next uint64
}

// read collects and prepares batches until an error.
func (s *Settler) read(ctx context.Context, it jetstream.MessagesContext, ready chan<- *prepared) error {
	batch := make([]jetstream.Msg, 0, s.cfg.BatchRows)
	for {
		var err error
		batch, err = s.collect(ctx, it, batch[:0])
		if err != nil {
			return err
		}
		p, err := s.prepare(ctx, batch)
		if err != nil {
			return err
		}
		select {
		case ready <- p:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

// write stores prepared batches in order until ready closes or an error.
func (s *Settler) write(ctx context.Context, ready <-chan *prepared) error {
	for p := range ready {
		if err := s.store(ctx, p); err != nil {
			return err
		}
	}
	return nil
}

// position reads the ledger's position once no earlier insert can still
// change it: inserts of a writer that crashed or was cancelled are ended
// first (ClickHouse completes an insert it has received whole even when its
// client is gone).
func (s *Settler) position(ctx context.Context) (uint64, error) {
	if err := s.ledger.FinishInserts(ctx); err != nil {
		return 0, err
	}
	return s.ledger.MaxSeq(ctx)
}

// consumer (re)creates the durable consumer so that it delivers from seq on
// in stream order, with no delivery state from before: the ledger, not the
// consumer, knows what is settled.
func (s *Settler) consumer(ctx context.Context, seq uint64) (jetstream.Consumer, error) {
	err := s.js.DeleteConsumer(ctx, subjects.StreamUsage, s.cfg.Consumer)
	if err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil, fmt.Errorf("consumer %s: delete: %w", s.cfg.Consumer, err)
	}
	cons, err := s.js.CreateConsumer(ctx, subjects.StreamUsage, jetstream.ConsumerConfig{
		Durable:       s.cfg.Consumer,
		Description:   "settlement: usage events into the ledger, from its position on",
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:   seq,
		AckPolicy:     jetstream.AckAllPolicy,
		AckWait:       s.cfg.AckWait,
		MaxDeliver:    -1,
		MaxAckPending: 4 * s.cfg.BatchRows,
	})
	if err != nil {
		return nil, fmt.Errorf("consumer %s: create from %d: %w", s.cfg.Consumer, seq, err)
	}
	return cons, nil
}

// collect waits for a first message, then gathers up to BatchRows of them
// for at most BatchWait.
func (s *Settler) collect(ctx context.Context, it jetstream.MessagesContext, batch []jetstream.Msg) ([]jetstream.Msg, error) {
	m, err := it.Next(jetstream.NextContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("next usage event: %w", err)
	}
	batch = append(batch, m)
	bctx, cancel := context.WithTimeout(ctx, s.cfg.BatchWait)
	defer cancel()
	for len(batch) < s.cfg.BatchRows {
		m, err := it.Next(jetstream.NextContext(bctx))
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				break
			}
			return nil, fmt.Errorf("next usage event: %w", err)
		}
		batch = append(batch, m)
	}
	return batch, nil
}

type deadLetter struct {
	msg    jetstream.Msg
	seq    uint64
	reason string
	cause  error
	span   trace.Span
}

// rowInfo is what a batch keeps beside each row it will store.
type rowInfo struct {
	// msg is the event as published (its data goes to the customer streams).
	msg jetstream.Msg
	// span follows the event through settlement in its request's trace.
	span trace.Span
	// lookup: the event reached the stream so late after its end that the
	// stream's de-duplication may have missed a second publish of it, so
	// the ledger is asked whether its id is stored already.
	lookup bool
}

// startSpan starts the span of settling one event, in the trace of the
// request it is for; events without trace context get none.
func startSpan(m jetstream.Msg, seq uint64) trace.Span {
	h := m.Headers()
	if h.Get("traceparent") == "" {
		return nil
	}
	ctx := otel.GetTextMapPropagator().Extract(context.Background(), telemetry.HeaderCarrier(h))
	_, span := otel.Tracer(TracerName).Start(ctx, "settlement.settle", trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.Int64("seq", int64(seq)), attribute.String("subject", m.Subject())))
	return span
}

// endSpan ends span (nil: none) with the event's outcome.
func endSpan(span trace.Span, outcome string, err error) {
	if span == nil {
		return
	}
	span.SetAttributes(attribute.String("outcome", outcome))
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// abandon ends the spans of a batch that will not be stored now (its
// session failed; the events are delivered again).
func (p *prepared) abandon(err error) {
	for _, a := range p.about {
		endSpan(a.span, "retried", err)
	}
	for _, d := range p.dead {
		endSpan(d.span, "retried", err)
	}
}

// prepare verifies and prices one batch; see the package documentation
// for what happens to it then.
func (s *Settler) prepare(ctx context.Context, batch []jetstream.Msg) (*prepared, error) {
	book := s.prices.Load()
	events := make([]wire.UsageEvent, len(batch))
	p := &prepared{rows: make([]ledger.Row, 0, len(batch)), about: make([]rowInfo, 0, len(batch))}
	for i, m := range batch {
		md, err := m.Metadata()
		if err != nil {
			return nil, fmt.Errorf("usage message on %s: %w", m.Subject(), err)
		}
		seq := md.Sequence.Stream
		if seq > p.lastSeq {
			p.last, p.lastSeq = m, seq
		}
		if seq < s.next {
			s.m.Duplicates.Add(1)
			continue
		}
		if seq > s.next {
			if err := s.checkGap(ctx, s.next, seq); err != nil {
				p.abandon(err)
				return nil, err
			}
		}
		s.next = seq + 1
		ev := &events[i]
		span := startSpan(m, seq)
		reason, cause, err := s.check(ctx, m, ev)
		if err != nil {
			endSpan(span, "retried", err)
			p.abandon(err)
			return nil, err
		}
		if span != nil {
			span.SetAttributes(attribute.String("event", ev.ID), attribute.String("node", ev.Node), attribute.String("request", ev.Request))
		}
		if reason != "" {
			p.dead = append(p.dead, deadLetter{m, seq, reason, cause, span})
			continue
		}
		price, err := book.Price(ev)
		if err != nil {
			p.dead = append(p.dead, deadLetter{m, seq, ReasonPriceOverflow, err, span})
			continue
		}
		if !price.Priced {
			s.m.Unpriced.Add(1)
		}
		p.rows = append(p.rows, ledger.Row{Seq: seq, Event: ev, PriceVersion: price.Version, ChargeMicros: price.ChargeMicros, EarningMicros: price.EarningMicros})
		p.about = append(p.about, rowInfo{msg: m, span: span, lookup: md.Timestamp.Sub(ev.End) > s.replayAge})
	}
	p.next = s.next
	return p, nil
}

// store dead-letters, republishes, inserts and acknowledges one batch.
func (s *Settler) store(ctx context.Context, p *prepared) (err error) {
	defer func() {
		if err != nil {
			p.abandon(err)
		}
	}()
	if err := s.dropDuplicates(ctx, p); err != nil {
		return err
	}
	for i, d := range p.dead {
		msg := &nats.Msg{Subject: d.msg.Subject(), Data: d.msg.Data(), Header: d.msg.Headers()}
		if err := bus.DeadLetter(ctx, s.js, Service, d.reason, d.cause, msg, d.seq); err != nil {
			p.dead = p.dead[i:]
			return err
		}
		s.m.DeadLettered(d.reason)
		endSpan(d.span, "dead_lettered:"+d.reason, nil)
	}
	p.dead = nil
	settledAt := time.Now().UTC().Truncate(time.Second)
	if s.cfg.CustomerStreams {
		if err := s.publishCustomers(ctx, p, settledAt); err != nil {
			return err
		}
	}
	if err := s.insert(ctx, p.rows, settledAt); err != nil {
		return err
	}
	if err := p.last.Ack(); err != nil {
		// Harmless: a redelivery is skipped as a duplicate.
		s.log.Warn("ack usage batch", "err", err)
	}
	s.done = p.next
	s.m.Position.Store(p.next - 1)
	if len(p.rows) > 0 {
		s.stored.Store(p.rows[len(p.rows)-1].Seq)
		s.m.Settled.Add(int64(len(p.rows)))
		s.m.Batches.Add(1)
	}
	for _, a := range p.about {
		endSpan(a.span, "settled", nil)
	}
	p.about = nil
	return nil
}

// dropDuplicates moves to the dead letters every row whose event id is
// stored already or comes earlier in the batch: a node published it again
// after the stream's de-duplication window had passed. It runs when every
// earlier batch is stored, so the ledger knows every earlier sequence.
func (s *Settler) dropDuplicates(ctx context.Context, p *prepared) error {
	var lookup []*wire.UsageEvent
	for i, a := range p.about {
		if a.lookup {
			lookup = append(lookup, p.rows[i].Event)
		}
	}
	// While ClickHouse is away, consuming stops here as it does at the
	// insert.
	var stored map[string]bool
	delay := s.cfg.RetryMin
	for {
		var err error
		if stored, err = s.ledger.StoredIDs(ctx, lookup); err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.m.InsertErrors.Add(1)
		s.log.Warn("ledger lookup of replayed events failed; consuming stops until it succeeds", "events", len(lookup), "err", err, "retry_in", delay)
		if !sleep(ctx, delay) {
			return ctx.Err()
		}
		delay = min(2*delay, s.cfg.RetryMax)
	}
	seen := make(map[string]bool, len(p.rows))
	keep := 0
	for i, r := range p.rows {
		id := r.Event.ID
		if stored[id] || seen[id] {
			s.log.Warn("usage event settled already; dead-lettered", "id", id, "node", r.Event.Node, "seq", r.Seq)
			p.dead = append(p.dead, deadLetter{p.about[i].msg, r.Seq, ReasonDuplicate,
				fmt.Errorf("event %q is settled already at an earlier sequence", id), p.about[i].span})
			continue
		}
		seen[id] = true
		p.rows[keep], p.about[keep] = r, p.about[i]
		keep++
	}
	p.rows, p.about = p.rows[:keep], p.about[:keep]
	return nil
}

// checkGap returns nil when every sequence in [from, to) is gone from the
// stream (removed by limits or deleted), and an error otherwise: those
// events were delivered elsewhere or lost in transit, and delivery must
// start again from the ledger's position.
func (s *Settler) checkGap(ctx context.Context, from, to uint64) error {
	stream, err := s.js.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		return fmt.Errorf("gap %d..%d: %w", from, to-1, err)
	}
	first := stream.CachedInfo().State.FirstSeq
	for seq := from; seq < to; seq++ {
		if seq < first {
			continue
		}
		_, err := stream.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("gap %d..%d: %w", from, to-1, err)
		}
		return fmt.Errorf("%w: event %d was not delivered before %d", ErrDeliveryGap, seq, to)
	}
	s.log.Error("usage events left the stream before they were settled", "from_seq", from, "to_seq", to-1)
	return nil
}

// check decodes and verifies one event. A non-empty reason means the event
// is dead-lettered; err means settling cannot go on (ctx ended).
func (s *Settler) check(ctx context.Context, m jetstream.Msg, ev *wire.UsageEvent) (reason string, cause, err error) {
	if err := json.Unmarshal(m.Data(), ev, json.RejectUnknownMembers(true)); err != nil {
		return ReasonMalformed, fmt.Errorf("decode usage event: %w", err), nil
	}
	if err := ev.Validate(); err != nil {
		return ReasonMalformed, err, nil
	}
	if want := subjects.UsageNode(ev.Node); m.Subject() != want {
		return ReasonWrongSubject, fmt.Errorf("event of node %q published on %s", ev.Node, m.Subject()), nil
	}
	if id := m.Headers().Get(wire.HdrMsgID); id != "" && id != ev.ID {
		return ReasonMalformed, fmt.Errorf("Nats-Msg-Id %q differs from event id %q", id, ev.ID), nil
	}
	keys, err := s.nodeKeys(ctx, ev.Node)
	if errors.Is(err, nodekeys.ErrUnknownNode) {
		return ReasonUnknownNode, err, nil
	}
	if err != nil {
		return "", nil, err
	}
	if !slices.Contains(keys, ev.PublicKey) {
		return ReasonKeyMismatch, fmt.Errorf("event %q signed by %s, not a key registered for node %q", ev.ID, ev.PublicKey, ev.Node), nil
	}
	if err := s.verifier.Verify(ev); err != nil {
		if errors.Is(err, usagesig.ErrMalformed) {
			return ReasonMalformed, err, nil
		}
		return ReasonBadSignature, err, nil
	}
	return "", nil, nil
}

// nodeKeys asks the resolver, retrying transient failures until ctx ends.
func (s *Settler) nodeKeys(ctx context.Context, node string) ([]string, error) {
	delay := s.cfg.RetryMin
	for {
		keys, err := s.keys.NodeKeys(ctx, node)
		if err == nil || errors.Is(err, nodekeys.ErrUnknownNode) {
			return keys, err
		}
		s.log.Warn("node keys", "node", node, "err", err, "retry_in", delay)
		if !sleep(ctx, delay) {
			return nil, ctx.Err()
		}
		delay = min(2*delay, s.cfg.RetryMax)
	}
}

// publishCustomers republishes a batch's rows to their customers' subjects
// and waits until JetStream has stored them all. It runs before the insert:
// after a crash between the two the batch is redelivered and published
// again, and the stream drops the duplicates by event id.
func (s *Settler) publishCustomers(ctx context.Context, p *prepared, settledAt time.Time) error {
	if len(p.rows) == 0 {
		return nil
	}
	futures := make([]jetstream.PubAckFuture, 0, len(p.rows))
	for i, r := range p.rows {
		ev := r.Event
		data, err := customerUsage(nil, p.about[i].msg.Data(), r, settledAt)
		if err != nil {
			return fmt.Errorf("customer usage %q: %w", ev.ID, err)
		}
		msg := nats.NewMsg(subjects.CustomerUsage(ev.Customer, ev.Model))
		msg.Header.Set(wire.HdrMsgID, ev.ID)
		msg.Data = data
		f, err := s.pub.PublishMsgAsync(msg)
		if err != nil {
			return fmt.Errorf("customer usage %q: %w", ev.ID, err)
		}
		futures = append(futures, f)
	}
	timeout := time.NewTimer(max(s.cfg.AckWait/2, 5*time.Second))
	defer timeout.Stop()
	select {
	case <-s.pub.PublishAsyncComplete():
	case <-ctx.Done():
		return ctx.Err()
	case <-timeout.C:
		return fmt.Errorf("customer usage: %d publishes unacknowledged", s.pub.PublishAsyncPending())
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return fmt.Errorf("customer usage %s: %w", f.Msg().Header.Get(wire.HdrMsgID), err)
		}
	}
	return nil
}

// customerUsage appends the JSON of wire.CustomerUsage for row r to dst.
// The event goes in as the node published it (decoding checked it against
// the schema's rules; it is what the signature covers), unless it holds a
// null, which decoding accepts as a zero value but the schema does not: then
// it is encoded afresh.
func customerUsage(dst, raw []byte, r ledger.Row, settledAt time.Time) ([]byte, error) {
	if bytes.Contains(raw, []byte("null")) {
		b, err := json.Marshal(wire.CustomerUsage{Event: *r.Event, Seq: r.Seq, PriceVersion: r.PriceVersion, ChargeMicros: r.ChargeMicros, SettledAt: settledAt})
		return append(dst, b...), err
	}
	dst = append(dst, `{"event":`...)
	dst = append(dst, bytes.TrimSpace(raw)...)
	dst = append(dst, `,"seq":`...)
	dst = strconv.AppendUint(dst, r.Seq, 10)
	dst = append(dst, `,"price_version":`...)
	dst = strconv.AppendUint(dst, r.PriceVersion, 10)
	dst = append(dst, `,"charge_micros":`...)
	dst = strconv.AppendInt(dst, r.ChargeMicros, 10)
	dst = append(dst, `,"settled_at":"`...)
	dst = settledAt.UTC().AppendFormat(dst, time.RFC3339Nano)
	return append(dst, `"}`...), nil
}

// insert stores rows, retrying with back-off until it succeeds or ctx ends.
// Before a retry it re-reads the ledger's position: a failed insert may have
// been written all the same.
func (s *Settler) insert(ctx context.Context, rows []ledger.Row, settledAt time.Time) error {
	delay := s.cfg.RetryMin
	for len(rows) > 0 {
		err := s.ledger.Insert(ctx, rows, settledAt)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.m.InsertErrors.Add(1)
		s.log.Warn("ledger insert failed; consuming stops until it succeeds", "rows", len(rows), "err", err, "retry_in", delay)
		for {
			if !sleep(ctx, delay) {
				return ctx.Err()
			}
			delay = min(2*delay, s.cfg.RetryMax)
			pos, err := s.position(ctx)
			if err == nil {
				s.stored.Store(pos)
				i, _ := slices.BinarySearchFunc(rows, pos+1, func(r ledger.Row, seq uint64) int {
					switch {
					case r.Seq < seq:
						return -1
					case r.Seq > seq:
						return 1
					}
					return 0
				})
				rows = rows[i:]
				break
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			s.log.Warn("ledger position unavailable", "err", err, "retry_in", delay)
		}
	}
	return nil
}

// rollupLoop brings the hourly rollups up to the ledger's position every
// RollupInterval.
func (s *Settler) rollupLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.RollupInterval)
	defer t.Stop()
	var rolled uint64
	unsure := true // a rollup step of an earlier writer may still run
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		upTo := s.stored.Load()
		if upTo == 0 || upTo <= rolled {
			continue
		}
		if unsure {
			if err := s.ledger.FinishRollups(ctx); err != nil {
				continue
			}
			unsure = false
		}
		if err := s.ledger.Rollup(ctx, upTo); err != nil {
			unsure = true
			if ctx.Err() == nil {
				s.log.Warn("hourly rollup", "up_to", upTo, "err", err)
			}
			continue
		}
		rolled = upTo
		s.m.RollupPosition.Store(upTo)
	}
}

// lagLoop measures every LagInterval how many events, and how many seconds
// of them, stream USAGE holds beyond the settled position.
func (s *Settler) lagLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.LagInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		stream, err := s.js.Stream(ctx, subjects.StreamUsage)
		if err != nil {
			continue
		}
		last := stream.CachedInfo().State.LastSeq
		pos := s.m.Position.Load()
		if last <= pos {
			s.m.LagEvents.Store(0)
			s.m.SetLagSeconds(0)
			continue
		}
		s.m.LagEvents.Store(int64(last - pos))
		if msg, err := stream.GetMsg(ctx, pos+1); err == nil {
			s.m.SetLagSeconds(max(0, time.Since(msg.Time).Seconds()))
		}
	}
}
