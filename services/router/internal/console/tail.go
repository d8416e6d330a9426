package console

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// tail keeps the last events of a stream, following it as it grows.
type tail[T any] struct {
	stream, filter string
	decode         func([]byte) (T, error)

	mu   sync.Mutex
	last []T
}

func newTail[T any](stream, filter string, decode func([]byte) (T, error)) *tail[T] {
	return &tail[T]{stream: stream, filter: filter, decode: decode}
}

// items returns the kept events, newest first.
func (t *tail[T]) items() []T {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]T, 0, len(t.last))
	for i := len(t.last) - 1; i >= 0; i-- {
		out = append(out, t.last[i])
	}
	return out
}

func (t *tail[T]) add(v T) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.last = append(t.last, v)
	if len(t.last) > recent {
		t.last = append(t.last[:0], t.last[len(t.last)-recent:]...)
	}
}

// run follows the stream from its last `recent` events on with an ordered
// consumer (which recovers from lost connections itself), until ctx ends.
func (t *tail[T]) run(ctx context.Context, js jetstream.JetStream, log *slog.Logger) {
	for ctx.Err() == nil {
		err := t.follow(ctx, js)
		if ctx.Err() != nil {
			return
		}
		log.Debug("console: stream tail restarts", "stream", t.stream, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (t *tail[T]) follow(ctx context.Context, js jetstream.JetStream) error {
	st, err := js.Stream(ctx, t.stream)
	if err != nil {
		return err
	}
	start := uint64(1)
	t.mu.Lock()
	known := len(t.last) > 0
	t.mu.Unlock()
	if last := st.CachedInfo().State.LastSeq; last > recent && !known {
		start = last - recent + 1
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{t.filter}, DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: start}
	if known {
		// After a failure, only what is new.
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverNewPolicy, 0
	}
	cons, err := js.OrderedConsumer(ctx, t.stream, cfg)
	if err != nil {
		return err
	}
	it, err := cons.Messages()
	if err != nil {
		return err
	}
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		<-fctx.Done()
		it.Stop()
	}()
	for {
		m, err := it.Next()
		if err != nil {
			return err
		}
		if v, err := t.decode(m.Data()); err == nil {
			t.add(v)
		}
	}
}
