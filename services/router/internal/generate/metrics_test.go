package generate

import (
	"fmt"
	"testing"
	"time"
)

// Activity counts tokens per whole second over the last minute, forgets
// older seconds, and keeps the last failures.
func TestActivity(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	a := newActivity(func() time.Time { return now })
	tick := func(tokens int) {
		for range tokens {
			a.token()
		}
		now = now.Add(time.Second)
	}
	tick(5) // 70 s before the last second: forgotten
	now = now.Add(69 * time.Second)
	tick(3)
	tick(0)
	tick(7)
	got := a.TokensPerSecond()
	if len(got) != activityWindow {
		t.Fatalf("%d buckets, want %d", len(got), activityWindow)
	}
	var total int64
	for _, v := range got {
		total += v
	}
	if tail := fmt.Sprint(got[activityWindow-3:]); tail != "[3 0 7]" || total != 10 {
		t.Fatalf("last seconds %s, total %d; want [3 0 7], 10", tail, total)
	}
	for i := range maxFailures + 5 {
		a.failed(StageFailure{Request: fmt.Sprint("req-", i)})
	}
	f := a.Failures()
	if len(f) != maxFailures || f[0].Request != "req-5" || f[len(f)-1].Request != fmt.Sprint("req-", maxFailures+4) {
		t.Fatalf("%d failures from %s to %s", len(f), f[0].Request, f[len(f)-1].Request)
	}
}
