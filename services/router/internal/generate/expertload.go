package generate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// expertLoad counts, per model, layer and expert, the token rows this
// router saw choose each expert since its last publication. Layers whose
// experts are spread are counted on every pass (the router computes them);
// the others only on the passes sampled (one in every), whose counts weigh
// every each.
type expertLoad struct {
	// every is the sampling period (0: no pass is sampled).
	every  int64
	passes atomic.Int64
	mu     sync.Mutex
	counts map[string]*wire.ExpertLoad
}

func newExpertLoad(every int) *expertLoad {
	return &expertLoad{every: int64(max(every, 0)), counts: map[string]*wire.ExpertLoad{}}
}

// sample reports whether this pass pauses at every layer with experts to
// count their choices: the every-th pass, the 2×every-th, and so on.
func (x *expertLoad) sample() bool {
	return x.every > 0 && x.passes.Add(1)%x.every == 0
}

// count adds the choices of a routed batch of layer l, each weight times.
func (x *expertLoad) count(model string, layers, experts, l int, r wire.Routed, weight int64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	c := x.counts[model]
	if c == nil || c.Layers != layers || c.Experts != experts {
		c = &wire.ExpertLoad{Model: model, Layers: layers, Experts: experts, Counts: make([][]int64, layers)}
		for i := range c.Counts {
			c.Counts[i] = make([]int64, experts)
		}
		x.counts[model] = c
	}
	for _, e := range r.Experts {
		if e >= 0 {
			c.Counts[l][e] += weight
		}
	}
	if l == 0 {
		c.Tokens += int64(r.Rows) * weight
	}
}

// take returns the counts gathered so far and starts afresh.
func (x *expertLoad) take() map[string]*wire.ExpertLoad {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := x.counts
	x.counts = map[string]*wire.ExpertLoad{}
	return out
}

// giveBack returns counts that could not be published, to be tried again.
func (x *expertLoad) giveBack(c *wire.ExpertLoad) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if cur := x.counts[c.Model]; cur != nil && cur.Add(c) == nil {
		return
	}
	x.counts[c.Model] = c
}

// PublishExpertLoad adds this router's expert-use counts to KV expertload
// every interval (and once more when ctx ends), until ctx ends. Each
// model's key holds the sum over all routers: a router reads it, adds its
// counts and writes it back with compare-and-set, retrying on a conflict.
func (e *Engine) PublishExpertLoad(ctx context.Context, interval time.Duration) error {
	kv, err := e.bus.JS.KeyValue(ctx, subjects.BucketExpertLoad)
	if err != nil {
		return fmt.Errorf("bucket %s: %w", subjects.BucketExpertLoad, err)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			e.flushExpertLoad(fctx, kv)
			cancel()
			return nil
		case <-t.C:
			e.flushExpertLoad(ctx, kv)
		}
	}
}

// FlushExpertLoad publishes the counts gathered so far at once.
func (e *Engine) FlushExpertLoad(ctx context.Context) error {
	kv, err := e.bus.JS.KeyValue(ctx, subjects.BucketExpertLoad)
	if err != nil {
		return err
	}
	return e.flushExpertLoad(ctx, kv)
}

func (e *Engine) flushExpertLoad(ctx context.Context, kv jetstream.KeyValue) error {
	var errs []error
	for model, c := range e.load.take() {
		if err := addExpertLoad(ctx, kv, c); err != nil {
			e.log.Warn("expert load not published; keeping it for the next round", "model", model, "err", err)
			e.load.giveBack(c)
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// addExpertLoad adds c to its model's key with compare-and-set. Counts of a
// different shape (the model was re-imported) replace the stored ones.
func addExpertLoad(ctx context.Context, kv jetstream.KeyValue, c *wire.ExpertLoad) error {
	for attempt := 0; attempt < 8; attempt++ {
		sum := *c
		sum.Counts = make([][]int64, len(c.Counts))
		for i := range c.Counts {
			sum.Counts[i] = append([]int64(nil), c.Counts[i]...)
		}
		var rev uint64
		cur, err := kv.Get(ctx, c.Model)
		switch {
		case err == nil:
			rev = cur.Revision()
			var old wire.ExpertLoad
			if wire.Decode(cur.Value(), &old) == nil && old.Validate() == nil && old.Add(c) == nil {
				sum = old
			}
		case !errors.Is(err, jetstream.ErrKeyNotFound):
			return err
		}
		sum.Updated = time.Now().UTC()
		b, err := json.Marshal(sum)
		if err != nil {
			return err
		}
		if rev == 0 {
			_, err = kv.Create(ctx, c.Model, b)
		} else {
			_, err = kv.Update(ctx, c.Model, b, rev)
		}
		if err == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) && !isWrongSequence(err) {
			return err
		}
	}
	return errors.New("too many concurrent updates")
}

// isWrongSequence reports a compare-and-set conflict on Update.
func isWrongSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}
