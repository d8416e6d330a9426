// Package settlement is the usage ledger: it consumes the signed usage
// events of stream USAGE, verifies each against its node's registered key,
// prices it, stores it exactly once in ClickHouse (raw events and hourly
// rollups), republishes it to its customer's own usage subjects, and answers
// statement queries over NATS and HTTP.
//
// See internal/settle for how exactly-once works, and README.md for the
// tables, the price book and customer access.
package settlement

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/services/settlement/internal/customers"
	"github.com/tessera-grid/tessera/services/settlement/internal/ledger"
	"github.com/tessera-grid/tessera/services/settlement/internal/metrics"
	"github.com/tessera-grid/tessera/services/settlement/internal/nodekeys"
	"github.com/tessera-grid/tessera/services/settlement/internal/prices"
	"github.com/tessera-grid/tessera/services/settlement/internal/settle"
	"github.com/tessera-grid/tessera/services/settlement/internal/statements"
)

// EnvPrefix is the prefix of settlement's environment variables.
const EnvPrefix = "TESSERA_SETTLEMENT_"

// Version is the version the micro service reports.
const Version = "0.1.0"

// Config is settlement's configuration, read from TESSERA_SETTLEMENT_*.
type Config struct {
	// ClickHouseAddr lists ClickHouse native-protocol addresses
	// (comma-separated host:port).
	ClickHouseAddr []string `env:"CLICKHOUSE_ADDR, default=127.0.0.1:9000"`
	// ClickHouseDatabase holds the ledger's tables; created if missing.
	ClickHouseDatabase string `env:"CLICKHOUSE_DATABASE, default=tessera"`
	ClickHouseUser     string `env:"CLICKHOUSE_USER, default=default"`
	ClickHousePassword string `env:"CLICKHOUSE_PASSWORD"`
	// BatchRows and BatchWait bound an insert: it happens when BatchRows
	// events are ready, or BatchWait after the first of them arrived.
	BatchRows int           `env:"BATCH_ROWS, default=10000"`
	BatchWait time.Duration `env:"BATCH_WAIT, default=200ms"`
	// Consumer is the durable consumer's name on stream USAGE.
	Consumer string `env:"CONSUMER, default=settlement"`
	// AckWait is how long JetStream waits for an acknowledgement before it
	// redelivers (redeliveries of stored events are skipped).
	AckWait time.Duration `env:"ACK_WAIT, default=60s"`
	// RetryMax caps the back-off while ClickHouse or NATS is unavailable.
	RetryMax time.Duration `env:"RETRY_MAX, default=5s"`
	// HTTPAddr serves statements and /metrics as JSON (empty: no HTTP).
	HTTPAddr string `env:"HTTP_ADDR"`
	// PriceFile is a JSON price book; empty means the price book in KV
	// prices (key "book"), followed as it changes.
	PriceFile string `env:"PRICE_FILE"`
	// CustomerStreams republishes settled events to each customer's subjects.
	CustomerStreams bool `env:"CUSTOMER_STREAMS, default=true"`
	// RollupInterval is how often the hourly rollups catch up.
	RollupInterval time.Duration `env:"ROLLUP_INTERVAL, default=10s"`
	// VerifyCache is how many verified batch signatures are remembered.
	VerifyCache int `env:"VERIFY_CACHE, default=65536"`
}

// Deps are what settlement runs on.
type Deps struct {
	// Bus is the connection to the NATS system (required).
	Bus *bus.Conn
	// Log defaults to slog.Default() with service=settlement.
	Log *slog.Logger
	// Keys resolves nodes' public keys; nil means the registry's records in
	// KV nodes, with every key seen kept in the ledger.
	Keys KeyResolver
}

// KeyResolver gives every public key the registry has held for a node,
// current or past, so that events signed before a node left or re-keyed
// still verify. An event verifies only with a key of its own node. An error
// wrapping ErrUnknownNode means the node never had a key (the event is
// dead-lettered); any other error is retried.
type KeyResolver interface {
	NodeKeys(ctx context.Context, node string) ([]string, error)
}

var (
	_ KeyResolver        = (*nodekeys.Registry)(nil)
	_ KeyResolver        = StaticKeys(nil)
	_ settle.KeyResolver = KeyResolver(nil)
)

// StaticKeys is a fixed KeyResolver: node id to its public keys.
type StaticKeys map[string][]string

// NodeKeys returns the node's keys.
func (k StaticKeys) NodeKeys(_ context.Context, node string) ([]string, error) {
	if keys := k[node]; len(keys) > 0 {
		return keys, nil
	}
	return nil, fmt.Errorf("node %q: %w", node, ErrUnknownNode)
}

// Dead-letter reasons, under subjects.DeadLetter("settlement", reason).
const (
	ReasonMalformed     = settle.ReasonMalformed
	ReasonWrongSubject  = settle.ReasonWrongSubject
	ReasonUnknownNode   = settle.ReasonUnknownNode
	ReasonKeyMismatch   = settle.ReasonKeyMismatch
	ReasonBadSignature  = settle.ReasonBadSignature
	ReasonPriceOverflow = settle.ReasonPriceOverflow
	ReasonDuplicate     = settle.ReasonDuplicate
)

// Statement types, as the endpoints return them.
type (
	// CustomerStatement is a customer's usage and charges per model.
	CustomerStatement = ledger.CustomerStatement
	// SupplierStatement is a supplier's earnings per device class.
	SupplierStatement = ledger.SupplierStatement
	// CustomerStatementRequest asks for a CustomerStatement.
	CustomerStatementRequest = statements.CustomerRequest
	// SupplierStatementRequest asks for a SupplierStatement.
	SupplierStatementRequest = statements.SupplierRequest
	// ConsumerRequest asks for a customer's usage consumer (re)created.
	ConsumerRequest = customers.ConsumerRequest
	// ConsumerReply names the consumer to pull from.
	ConsumerReply = customers.ConsumerReply
	// Metrics is what /metrics and the micro STATS report.
	Metrics = metrics.Snapshot
	// Permissions are NATS publish and subscribe allow-lists.
	Permissions = customers.Permissions
	// UsageRow is one settled event of a request, as stored.
	UsageRow = ledger.EventRow
)

// RequestUsage reads the settled events of request from the ledger that cfg
// names, in sequence order (for the CLI; statements are the API).
func RequestUsage(ctx context.Context, cfg Config, request string) ([]UsageRow, error) {
	led, err := ledger.Open(ledger.Options{Addr: cfg.ClickHouseAddr, Database: cfg.ClickHouseDatabase, User: cfg.ClickHouseUser, Password: cfg.ClickHousePassword})
	if err != nil {
		return nil, fmt.Errorf("settlement: %w", err)
	}
	defer led.Close()
	return led.RequestRows(ctx, request)
}

// CustomerPermissions returns the NATS permissions of customer's user: its
// own usage consumer and inbox, nothing else (see README.md).
func CustomerPermissions(customer string) (Permissions, error) {
	return customers.PermissionsFor(customer)
}

// Run runs settlement until ctx ends, then returns nil. It waits (with
// back-off) for ClickHouse rather than failing when it is away.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	if deps.Bus == nil || deps.Bus.NC == nil || deps.Bus.JS == nil {
		return fmt.Errorf("settlement: no NATS connection: %w", ErrConfig)
	}
	log := deps.Log
	if log == nil {
		log = slog.Default().With("service", "settlement")
	}
	retryMin := min(100*time.Millisecond, cfg.RetryMax)
	scfg := settle.Config{
		Consumer:        cfg.Consumer,
		BatchRows:       cfg.BatchRows,
		BatchWait:       cfg.BatchWait,
		AckWait:         cfg.AckWait,
		RetryMin:        retryMin,
		RetryMax:        cfg.RetryMax,
		CustomerStreams: cfg.CustomerStreams,
		RollupInterval:  cfg.RollupInterval,
		LagInterval:     time.Second,
	}
	if err := scfg.Validate(); err != nil {
		return fmt.Errorf("settlement: %w", err)
	}
	led, err := ledger.Open(ledger.Options{Addr: cfg.ClickHouseAddr, Database: cfg.ClickHouseDatabase, User: cfg.ClickHouseUser, Password: cfg.ClickHousePassword})
	if err != nil {
		return fmt.Errorf("settlement: %w", err)
	}
	defer led.Close()
	if err := retry(ctx, log, retryMin, cfg.RetryMax, "clickhouse migrate", led.Migrate); err != nil {
		return nil // ctx ended
	}
	js := deps.Bus.JS
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	goFn := func(f func()) {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}

	book, err := priceBook(ctx, cfg, js, log, goFn)
	if err != nil || ctx.Err() != nil {
		return err
	}
	keys := deps.Keys
	if keys == nil {
		kv, err := bus.WaitBootstrapped(ctx, js, subjects.BucketNodes)
		if err != nil {
			return nil // ctx ended
		}
		reg := nodekeys.New(kv, led, log)
		if err := reg.Load(ctx); err != nil {
			log.Warn("node keys kept in the ledger", "err", err)
		}
		goFn(func() {
			if err := reg.Watch(ctx); err != nil {
				log.Error("node keys", "err", err)
			}
		})
		keys = reg
	}

	m := &metrics.Settlement{}
	verifier := usagesig.NewVerifier(cfg.VerifyCache)
	m.SignatureChecks = verifier.SignatureChecks
	if unregister, err := m.Register(otel.Meter("github.com/tessera-grid/tessera/services/settlement")); err != nil {
		log.Warn("metrics registration", "err", err)
	} else {
		defer func() { _ = unregister() }()
	}
	st := statements.New(led, func() any { return m.Snapshot() }, log)
	svc, err := st.AddService(ctx, deps.Bus.NC, Version)
	if err != nil {
		return fmt.Errorf("settlement: %w", err)
	}
	if err := customers.New(js, log).AddEndpoint(ctx, svc); err != nil {
		return fmt.Errorf("settlement: %w", err)
	}
	if cfg.HTTPAddr != "" {
		if err := serveHTTP(ctx, cfg.HTTPAddr, st.Handler(), log, goFn); err != nil {
			return err
		}
	}

	s, err := settle.New(scfg, settle.Deps{NC: deps.Bus.NC, JS: js, Ledger: led, Keys: keys, Prices: book, Verifier: verifier, Metrics: m, Log: log})
	if err != nil {
		return fmt.Errorf("settlement: %w", err)
	}
	return s.Run(ctx)
}

// priceBook returns the book in force: from the file, or from KV, followed
// by a goroutine started with goFn (it returns once the value present at
// start, if any, is in force).
func priceBook(ctx context.Context, cfg Config, js jetstream.JetStream, log *slog.Logger, goFn func(func())) (*prices.Current, error) {
	book := &prices.Current{}
	if cfg.PriceFile != "" {
		b, err := prices.Load(cfg.PriceFile)
		if err != nil {
			return nil, fmt.Errorf("settlement: %w", err)
		}
		book.Store(b)
		log.Info("price book loaded", "file", cfg.PriceFile, "version", b.Version)
		return book, nil
	}
	ready := make(chan struct{})
	goFn(func() { watchPrices(ctx, js, book, log, ready) })
	select {
	case <-ready:
	case <-ctx.Done():
	}
	return book, nil
}

// serveHTTP serves h on addr until ctx ends.
func serveHTTP(ctx context.Context, addr string, h http.Handler, log *slog.Logger, goFn func(func())) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("settlement http %s: %w", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	goFn(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("settlement http", "err", err)
		}
	})
	goFn(func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	log.Info("statements over http", "addr", ln.Addr().String())
	return nil
}

// retry calls f until it succeeds, backing off from lo to hi; it fails only
// when ctx ends.
func retry(ctx context.Context, log *slog.Logger, lo, hi time.Duration, what string, f func(context.Context) error) error {
	delay := lo
	for {
		err := f(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn(what+" failed; retrying", "err", err, "in", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, hi)
	}
}

// watchPrices keeps book up to date with the price book in KV prices. It
// closes ready once the value present at start (if any) is in force.
func watchPrices(ctx context.Context, js jetstream.JetStream, book *prices.Current, log *slog.Logger, ready chan<- struct{}) {
	once := sync.OnceFunc(func() { close(ready) })
	defer once()
	kv, err := bus.WaitBootstrapped(ctx, js, subjects.BucketPrices)
	if err != nil {
		return
	}
	w, err := kv.Watch(ctx, subjects.KeyPriceBook)
	if err != nil {
		log.Error("price book watch", "err", err)
		return
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil {
				if book.Load() == nil {
					log.Warn("no price book in KV; events settle unpriced until one is put", "bucket", subjects.BucketPrices, "key", subjects.KeyPriceBook)
				}
				once()
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				continue
			}
			b, err := prices.Parse(e.Value())
			if err != nil {
				log.Error("price book rejected; the previous one stays in force", "revision", e.Revision(), "err", err)
				continue
			}
			if cur := book.Load(); cur != nil && b.Version <= cur.Version {
				log.Warn("price book version does not increase", "version", b.Version, "current", cur.Version)
			}
			book.Store(b)
			log.Info("price book in force", "version", b.Version, "revision", e.Revision())
		}
	}
}
