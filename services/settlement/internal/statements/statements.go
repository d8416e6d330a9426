// Package statements answers statement queries (a customer's usage and
// charges, a supplier's earnings, between two times) as NATS micro
// endpoints and as JSON over HTTP, and serves settlement's metrics.
//
// The HTTP API is for operators and billing systems, not for customers: it
// answers for any customer. Customers read their own usage from their
// usage subjects (see the settlement README).
package statements

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/services/settlement/internal/ledger"
)

// Ledger answers the statement queries.
type Ledger interface {
	CustomerStatement(ctx context.Context, customer string, from, to time.Time) (ledger.CustomerStatement, error)
	SupplierStatement(ctx context.Context, supplier string, from, to time.Time) (ledger.SupplierStatement, error)
}

var _ Ledger = (*ledger.Ledger)(nil)

// CustomerRequest asks for a customer's statement for the events that
// ended in [From, To).
type CustomerRequest struct {
	Customer string    `json:"customer"`
	From     time.Time `json:"from"`
	To       time.Time `json:"to"`
}

// SupplierRequest asks for a supplier's earnings for the events that ended
// in [From, To).
type SupplierRequest struct {
	Supplier string    `json:"supplier"`
	From     time.Time `json:"from"`
	To       time.Time `json:"to"`
}

// Server serves the queries.
type Server struct {
	ledger  Ledger
	metrics func() any
	log     *slog.Logger
	// timeout bounds one query.
	timeout time.Duration
}

// New returns a Server; metrics returns what /metrics and the micro STATS
// show.
func New(l Ledger, metrics func() any, log *slog.Logger) *Server {
	return &Server{ledger: l, metrics: metrics, log: log, timeout: 30 * time.Second}
}

func checkRange(who, id string, from, to time.Time) error {
	if err := subjects.Token(id); err != nil {
		return fmt.Errorf("%s: %w", who, err)
	}
	if from.IsZero() || to.IsZero() {
		return errors.New("from and to are required (RFC 3339 times)")
	}
	if !from.Before(to) {
		return fmt.Errorf("from %s is not before to %s", from.Format(time.RFC3339Nano), to.Format(time.RFC3339Nano))
	}
	return nil
}

func (s *Server) customer(ctx context.Context, r CustomerRequest) (any, error) {
	if err := checkRange("customer", r.Customer, r.From, r.To); err != nil {
		return nil, badRequest{err}
	}
	return s.ledger.CustomerStatement(ctx, r.Customer, r.From, r.To)
}

func (s *Server) supplier(ctx context.Context, r SupplierRequest) (any, error) {
	if err := checkRange("supplier", r.Supplier, r.From, r.To); err != nil {
		return nil, badRequest{err}
	}
	return s.ledger.SupplierStatement(ctx, r.Supplier, r.From, r.To)
}

// badRequest marks an error as the caller's.
type badRequest struct{ error }

func (b badRequest) Unwrap() error { return b.error }

// AddService registers the micro service "settlement" on nc with the
// statement endpoints; $SRV.PING, INFO and STATS answer for it, STATS with
// the metrics. It stops when ctx ends.
func (s *Server) AddService(ctx context.Context, nc *nats.Conn, version string) (micro.Service, error) {
	svc, err := micro.AddService(nc, micro.Config{
		Name:        "settlement",
		Version:     version,
		Description: "usage ledger: customer statements and supplier earnings",
		StatsHandler: func(*micro.Endpoint) any {
			return s.metrics()
		},
	})
	if err != nil {
		return nil, fmt.Errorf("micro service settlement: %w", err)
	}
	endpoints := []struct {
		name, subject string
		handle        func(context.Context, []byte) (any, error)
	}{
		{"customer_statement", subjects.SettlementCustomerStatement, func(ctx context.Context, b []byte) (any, error) {
			var r CustomerRequest
			if err := decode(b, &r); err != nil {
				return nil, err
			}
			return s.customer(ctx, r)
		}},
		{"supplier_statement", subjects.SettlementSupplierStatement, func(ctx context.Context, b []byte) (any, error) {
			var r SupplierRequest
			if err := decode(b, &r); err != nil {
				return nil, err
			}
			return s.supplier(ctx, r)
		}},
	}
	for _, ep := range endpoints {
		handle := ep.handle
		h := micro.ContextHandler(ctx, func(ctx context.Context, req micro.Request) {
			ctx, cancel := context.WithTimeout(ctx, s.timeout)
			defer cancel()
			out, err := handle(ctx, req.Data())
			if err != nil {
				code := "500"
				if errors.As(err, new(badRequest)) {
					code = "400"
				}
				_ = req.Error(code, err.Error(), nil)
				return
			}
			if err := req.RespondJSON(out); err != nil {
				s.log.Warn("statement reply", "err", err)
			}
		})
		if err := svc.AddEndpoint(ep.name, h, micro.WithEndpointSubject(ep.subject)); err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("micro endpoint %s: %w", ep.name, err)
		}
	}
	go func() {
		<-ctx.Done()
		_ = svc.Stop()
	}()
	return svc, nil
}

func decode(b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return badRequest{fmt.Errorf("request body: %w", err)}
	}
	return nil
}

// Handler serves:
//
//	GET /v1/customers/{customer}/statement?from=RFC3339&to=RFC3339
//	GET /v1/suppliers/{supplier}/statement?from=RFC3339&to=RFC3339
//	GET /metrics
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/customers/{customer}/statement", func(w http.ResponseWriter, r *http.Request) {
		from, to, err := timeRange(r)
		if err != nil {
			s.reply(w, nil, err)
			return
		}
		out, err := s.customer(r.Context(), CustomerRequest{Customer: r.PathValue("customer"), From: from, To: to})
		s.reply(w, out, err)
	})
	mux.HandleFunc("GET /v1/suppliers/{supplier}/statement", func(w http.ResponseWriter, r *http.Request) {
		from, to, err := timeRange(r)
		if err != nil {
			s.reply(w, nil, err)
			return
		}
		out, err := s.supplier(r.Context(), SupplierRequest{Supplier: r.PathValue("supplier"), From: from, To: to})
		s.reply(w, out, err)
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		s.reply(w, s.metrics(), nil)
	})
	return mux
}

func timeRange(r *http.Request) (from, to time.Time, err error) {
	q := r.URL.Query()
	for _, p := range []struct {
		name string
		t    *time.Time
	}{{"from", &from}, {"to", &to}} {
		v := q.Get(p.name)
		if v == "" {
			return from, to, badRequest{fmt.Errorf("query parameter %s is required (RFC 3339 time)", p.name)}
		}
		if *p.t, err = time.Parse(time.RFC3339Nano, v); err != nil {
			return from, to, badRequest{fmt.Errorf("query parameter %s: %w", p.name, err)}
		}
	}
	return from, to, nil
}

func (s *Server) reply(w http.ResponseWriter, out any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		status := http.StatusInternalServerError
		if errors.As(err, new(badRequest)) {
			status = http.StatusBadRequest
		} else {
			s.log.Warn("statement query", "err", err)
		}
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	_ = json.NewEncoder(w).Encode(out)
}
