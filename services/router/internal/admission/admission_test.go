package admission

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestConcurrencyLimitQueuesThenRefuses(t *testing.T) {
	c := New(Limits{Concurrent: 2}, 1, 200*time.Millisecond)
	ctx := context.Background()
	a, err := c.Admit(ctx, "a", 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Admit(ctx, "a", 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A third waits in the queue and gets the slot when one frees.
	got := make(chan error, 1)
	go func() {
		tk, err := c.Admit(ctx, "a", 10, nil)
		if err == nil {
			tk.Done(10)
		}
		got <- err
	}()
	time.Sleep(20 * time.Millisecond)
	// A fourth finds the queue (size 1) full.
	if _, err := c.Admit(ctx, "a", 10, nil); !errors.Is(err, ErrLimited) {
		t.Fatalf("queue full: got %v", err)
	}
	// Another customer is unaffected.
	o, err := c.Admit(ctx, "other", 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	o.Done(10)
	a.Done(10)
	if err := <-got; err != nil {
		t.Fatalf("queued request: %v", err)
	}
	b.Done(10)
	// Waiting longer than the queue allows is refused with a retry time.
	x, _ := c.Admit(ctx, "a", 1, nil)
	y, _ := c.Admit(ctx, "a", 1, nil)
	_, err = c.Admit(ctx, "a", 1, nil)
	var l *Limited
	if !errors.As(err, &l) || l.RetryAfter <= 0 {
		t.Fatalf("queue timeout: got %v", err)
	}
	x.Done(1)
	y.Done(1)
}

func TestTokensPerMinute(t *testing.T) {
	now := time.Unix(0, 0)
	c := New(Limits{TokensPerMinute: 600}, 10, time.Second)
	c.now = func() time.Time { return now }
	ctx := context.Background()
	tk, err := c.Admit(ctx, "a", 500, nil)
	if err != nil {
		t.Fatal(err)
	}
	tk.Done(400) // 100 unused come back: 200 left
	_, err = c.Admit(ctx, "a", 300, nil)
	var l *Limited
	if !errors.As(err, &l) {
		t.Fatalf("want a limit, got %v", err)
	}
	// 100 more tokens at 10 tokens/s: 10 s.
	if l.RetryAfter != 10*time.Second {
		t.Fatalf("retry after %v, want 10s", l.RetryAfter)
	}
	now = now.Add(10 * time.Second)
	if _, err := c.Admit(ctx, "a", 300, nil); err != nil {
		t.Fatalf("after refill: %v", err)
	}
	if _, err := c.Admit(ctx, "a", 700, nil); !errors.As(err, &l) || l.RetryAfter != time.Minute {
		t.Fatalf("over the whole quota: %v", err)
	}
	// Per-customer override.
	if _, err := c.Admit(ctx, "b", 5000, &Limits{TokensPerMinute: 10000}); err != nil {
		t.Fatal(err)
	}
}
