// Package customers gives each enterprise customer its own live, durable,
// replayable usage feed and nothing else.
//
// Settlement republishes every settled event to
// subjects.CustomerUsage(customer, model), kept by stream CUSTOMER_USAGE.
// Each customer has one durable pull consumer on that stream, named after
// the customer and filtered to its own subtree; settlement creates it, and
// re-creates it from a point in time, when the customer asks on
// subjects.SettlementCustomerConsumer(customer). The customer's NATS user
// (Permissions) may only ask there, pull from and acknowledge on its own
// consumer, read its info, and receive replies in its own inbox prefix. It
// cannot create consumers itself: a consumer's config can push deliveries to
// any subject, and a wildcard consumer name would let it take over another
// customer's consumer.
package customers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// Permissions are a customer user's NATS permissions: only these subjects
// are allowed, everything else is denied.
type Permissions struct {
	Publish   []string `json:"publish"`
	Subscribe []string `json:"subscribe"`
}

// PermissionsFor returns customer's permissions (see the package comment).
// The customer's clients must use subjects.CustomerInbox(customer) as their
// inbox prefix (nats.CustomInboxPrefix).
func PermissionsFor(customer string) (Permissions, error) {
	if err := subjects.Token(customer); err != nil {
		return Permissions{}, fmt.Errorf("customer: %w", err)
	}
	stream, name := subjects.StreamCustomerUsage, ConsumerName(customer)
	return Permissions{
		Publish: []string{
			subjects.SettlementCustomerConsumer(customer),
			"$JS.API.CONSUMER.INFO." + stream + "." + name,
			"$JS.API.CONSUMER.MSG.NEXT." + stream + "." + name,
			// Acknowledgements: the reply subjects of delivered messages,
			// in the short and the domain-qualified form.
			"$JS.ACK." + stream + "." + name + ".>",
			"$JS.ACK.*.*." + stream + "." + name + ".>",
		},
		Subscribe: []string{subjects.CustomerInbox(customer) + ".>"},
	}, nil
}

// ConsumerName is the name of customer's durable consumer on stream
// CUSTOMER_USAGE.
func ConsumerName(customer string) string { return customer }

// Delivery policies a customer may ask for.
const (
	// DeliverAll replays every event still in the stream.
	DeliverAll = "all"
	// DeliverNew delivers events settled from now on.
	DeliverNew = "new"
	// DeliverByStartTime replays from the first event settled at or after
	// StartTime.
	DeliverByStartTime = "by_start_time"
)

// ConsumerRequest asks for the customer's consumer to be (re)created.
type ConsumerRequest struct {
	// Deliver is DeliverAll (the default), DeliverNew or DeliverByStartTime.
	Deliver   string     `json:"deliver,omitempty"`
	StartTime *time.Time `json:"start_time,omitempty"`
}

// ConsumerReply names the consumer to pull from.
type ConsumerReply struct {
	Stream        string `json:"stream"`
	Consumer      string `json:"consumer"`
	FilterSubject string `json:"filter_subject"`
	// Pending is the number of events waiting for the consumer.
	Pending uint64 `json:"pending"`
}

// Consumers manages the customers' consumers.
type Consumers struct {
	js  jetstream.JetStream
	log *slog.Logger
}

// New returns Consumers working through js.
func New(js jetstream.JetStream, log *slog.Logger) *Consumers {
	return &Consumers{js: js, log: log}
}

// Reset (re)creates customer's consumer as asked.
func (c *Consumers) Reset(ctx context.Context, customer string, req ConsumerRequest) (ConsumerReply, error) {
	if err := subjects.Token(customer); err != nil {
		return ConsumerReply{}, fmt.Errorf("customer: %w: %w", err, ErrBadRequest)
	}
	cfg := jetstream.ConsumerConfig{
		Durable:       ConsumerName(customer),
		Description:   "usage of customer " + customer,
		FilterSubject: subjects.CustomerUsageFilter(customer),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       30 * time.Second,
		MaxAckPending: 10000,
	}
	switch req.Deliver {
	case "", DeliverAll:
		cfg.DeliverPolicy = jetstream.DeliverAllPolicy
	case DeliverNew:
		cfg.DeliverPolicy = jetstream.DeliverNewPolicy
	case DeliverByStartTime:
		if req.StartTime == nil || req.StartTime.IsZero() {
			return ConsumerReply{}, fmt.Errorf("deliver %s needs start_time: %w", DeliverByStartTime, ErrBadRequest)
		}
		cfg.DeliverPolicy = jetstream.DeliverByStartTimePolicy
		cfg.OptStartTime = req.StartTime
	default:
		return ConsumerReply{}, fmt.Errorf("deliver %q: want %s, %s or %s: %w", req.Deliver, DeliverAll, DeliverNew, DeliverByStartTime, ErrBadRequest)
	}
	// The delivery policy of a consumer cannot change: replace it.
	err := c.js.DeleteConsumer(ctx, subjects.StreamCustomerUsage, cfg.Durable)
	if err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return ConsumerReply{}, fmt.Errorf("consumer %s: %w", cfg.Durable, err)
	}
	cons, err := c.js.CreateConsumer(ctx, subjects.StreamCustomerUsage, cfg)
	if err != nil {
		return ConsumerReply{}, fmt.Errorf("consumer %s: %w", cfg.Durable, err)
	}
	info := cons.CachedInfo()
	c.log.Info("customer consumer reset", "customer", customer, "deliver", cfg.DeliverPolicy.String(), "pending", info.NumPending)
	return ConsumerReply{Stream: subjects.StreamCustomerUsage, Consumer: cfg.Durable, FilterSubject: cfg.FilterSubject, Pending: info.NumPending}, nil
}

// AddEndpoint serves subjects.SettlementCustomerConsumerAll on svc: the
// customer is the subject's last token, which NATS permissions guarantee is
// the asking customer's own.
func (c *Consumers) AddEndpoint(ctx context.Context, svc micro.Service) error {
	h := micro.ContextHandler(ctx, func(ctx context.Context, r micro.Request) {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		customer := strings.TrimPrefix(r.Subject(), subjects.SettlementCustomerConsumer(""))
		var req ConsumerRequest
		if len(r.Data()) > 0 {
			if err := wire.Decode(r.Data(), &req); err != nil {
				_ = r.Error("400", err.Error(), nil)
				return
			}
		}
		out, err := c.Reset(ctx, customer, req)
		if err != nil {
			code := "500"
			if errors.Is(err, ErrBadRequest) {
				code = "400"
			}
			_ = r.Error(code, err.Error(), nil)
			return
		}
		_ = r.RespondJSON(out)
	})
	return svc.AddEndpoint("customer_consumer", h, micro.WithEndpointSubject(subjects.SettlementCustomerConsumerAll))
}
