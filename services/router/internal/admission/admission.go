// Package admission decides whether a request may start: per-customer
// concurrency and tokens-per-minute quotas, and a bounded queue for requests
// that wait for a concurrency slot.
package admission

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// ErrLimited is wrapped by a *Limited error.
var ErrLimited = errors.New("rate limited")

// Limited says a request was refused and when to retry.
type Limited struct {
	Reason     string
	RetryAfter time.Duration
}

func (l *Limited) Error() string {
	return fmt.Sprintf("%s; retry after %s", l.Reason, l.RetryAfter.Round(time.Second))
}

// Unwrap makes errors.Is(err, ErrLimited) hold.
func (l *Limited) Unwrap() error { return ErrLimited }

// Limits are one customer's quotas; zero means unlimited.
type Limits struct {
	// Concurrent is how many of the customer's requests run at once.
	Concurrent int `json:"concurrent,omitempty"`
	// TokensPerMinute caps prompt plus completion tokens per minute.
	TokensPerMinute int `json:"tokens_per_minute,omitempty"`
}

// Controller admits requests. It is safe for concurrent use.
type Controller struct {
	defaults  Limits
	queueSize int
	queueWait time.Duration
	now       func() time.Time

	mu        sync.Mutex
	customers map[string]*customer
	queued    int
}

type customer struct {
	active  int
	tokens  float64 // token bucket level
	updated time.Time
	wake    chan struct{} // closed when a slot frees
}

// New returns a controller with default per-customer limits, a queue of at
// most queueSize waiting requests, each waiting at most queueWait.
func New(defaults Limits, queueSize int, queueWait time.Duration) *Controller {
	return &Controller{defaults: defaults, queueSize: queueSize, queueWait: queueWait, now: time.Now, customers: map[string]*customer{}}
}

// Ticket is an admitted request; Done must be called when it ends.
type Ticket struct {
	c        *Controller
	customer string
	reserved int
	limits   Limits
	once     sync.Once
}

// Admit admits a request of customer that may use up to tokens tokens,
// waiting in the queue for a concurrency slot if needed. limits overrides
// the defaults when non-nil.
func (c *Controller) Admit(ctx context.Context, cust string, tokens int, limits *Limits) (*Ticket, error) {
	l := c.defaults
	if limits != nil {
		l = *limits
	}
	var deadline <-chan time.Time
	waiting := false
	defer func() {
		if waiting {
			c.mu.Lock()
			c.queued--
			c.mu.Unlock()
		}
	}()
	for {
		c.mu.Lock()
		cs := c.customer(cust, l)
		c.refill(cs, l)
		if l.TokensPerMinute > 0 && float64(tokens) > cs.tokens {
			need := float64(tokens) - cs.tokens
			c.mu.Unlock()
			if tokens > l.TokensPerMinute {
				return nil, &Limited{Reason: fmt.Sprintf("request needs %d tokens, more than the quota of %d tokens per minute", tokens, l.TokensPerMinute), RetryAfter: time.Minute}
			}
			wait := time.Duration(math.Ceil(need / (float64(l.TokensPerMinute) / 60) * float64(time.Second)))
			return nil, &Limited{Reason: fmt.Sprintf("tokens-per-minute quota of %d reached", l.TokensPerMinute), RetryAfter: max(wait, time.Second)}
		}
		if l.Concurrent <= 0 || cs.active < l.Concurrent {
			cs.active++
			if l.TokensPerMinute > 0 {
				cs.tokens -= float64(tokens)
			}
			c.mu.Unlock()
			return &Ticket{c: c, customer: cust, reserved: tokens, limits: l}, nil
		}
		// At the concurrency limit: wait in the bounded queue.
		if !waiting {
			if c.queued >= c.queueSize {
				c.mu.Unlock()
				return nil, &Limited{Reason: fmt.Sprintf("%d concurrent requests running and the queue is full", l.Concurrent), RetryAfter: time.Second}
			}
			c.queued++
			waiting = true
			deadline = time.After(c.queueWait)
		}
		wake := cs.wake
		c.mu.Unlock()
		select {
		case <-wake:
		case <-deadline:
			return nil, &Limited{Reason: fmt.Sprintf("%d concurrent requests running; waited %s in the queue", l.Concurrent, c.queueWait), RetryAfter: time.Second}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (c *Controller) customer(id string, l Limits) *customer {
	cs := c.customers[id]
	if cs == nil {
		cs = &customer{tokens: float64(l.TokensPerMinute), updated: c.now(), wake: make(chan struct{})}
		c.customers[id] = cs
	}
	return cs
}

// refill tops up the customer's token bucket for the time passed.
func (c *Controller) refill(cs *customer, l Limits) {
	now := c.now()
	if l.TokensPerMinute > 0 {
		cs.tokens = math.Min(float64(l.TokensPerMinute), cs.tokens+now.Sub(cs.updated).Seconds()*float64(l.TokensPerMinute)/60)
	}
	cs.updated = now
}

// Done ends the request, returning the unused part of its reservation.
func (t *Ticket) Done(usedTokens int) {
	t.once.Do(func() {
		c := t.c
		c.mu.Lock()
		defer c.mu.Unlock()
		cs := c.customers[t.customer]
		cs.active--
		if t.limits.TokensPerMinute > 0 && usedTokens < t.reserved {
			cs.tokens = math.Min(float64(t.limits.TokensPerMinute), cs.tokens+float64(t.reserved-usedTokens))
		}
		close(cs.wake)
		cs.wake = make(chan struct{})
	})
}
