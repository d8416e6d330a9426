package console

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

// Settlement is settlement's progress as its micro STATS endpoint reports
// it (the data of its statement endpoints).
type Settlement struct {
	// OK is false when no settlement instance answered.
	OK           bool             `json:"ok"`
	Error        string           `json:"error,omitempty"`
	Settled      int64            `json:"settled_events"`
	Position     uint64           `json:"position_seq"`
	LagEvents    int64            `json:"lag_events"`
	LagSeconds   float64          `json:"lag_seconds"`
	InsertErrors int64            `json:"insert_errors"`
	DeadLettered map[string]int64 `json:"dead_lettered"`
	Time         time.Time        `json:"time"`
}

// settlementEvery is how often settlement is asked, however often the
// page polls.
const settlementEvery = time.Second

// settlementStats asks settlement for its statistics, at most once per
// settlementEvery.
func (c *Console) settlementStats(ctx context.Context) Settlement {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.asked) < settlementEvery {
		return c.settlement
	}
	c.asked = time.Now()
	s, err := c.askSettlement(ctx)
	if err != nil {
		s = Settlement{Error: err.Error(), Time: time.Now().UTC()}
	}
	c.settlement = s
	return s
}

func (c *Console) askSettlement(ctx context.Context) (Settlement, error) {
	ctx, cancel := context.WithTimeout(ctx, 750*time.Millisecond)
	defer cancel()
	reply, err := c.bus.NC.RequestWithContext(ctx, subjects.ServiceStats("settlement"), nil)
	if err != nil {
		return Settlement{}, fmt.Errorf("settlement does not answer: %w", err)
	}
	var stats struct {
		Endpoints []struct {
			Data json.RawMessage `json:"data"`
		} `json:"endpoints"`
	}
	if err := json.Unmarshal(reply.Data, &stats); err != nil {
		return Settlement{}, fmt.Errorf("settlement stats: %w", err)
	}
	for _, ep := range stats.Endpoints {
		var s Settlement
		if len(ep.Data) > 0 && json.Unmarshal(ep.Data, &s) == nil && !s.Time.IsZero() {
			s.OK = true
			return s, nil
		}
	}
	return Settlement{}, fmt.Errorf("settlement stats carry no metrics")
}
