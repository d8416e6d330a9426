// Package ledger keeps settled usage in ClickHouse: raw usage events, hourly
// rollups per customer, supplier and model, the node keys seen, and the
// statement queries over them.
//
// Exactly-once rests on one fact: every row carries its sequence in stream
// USAGE, rows are inserted in sequence order, and one Insert writes one
// ClickHouse part, which appears whole or not at all. So MaxSeq is the
// position of the ledger: every settled event up to it is stored, none after
// it. Rollups follow the same rule with their own position (seq_hi).
package ledger

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Options says how to reach ClickHouse.
type Options struct {
	// Addr lists native-protocol addresses, host:port.
	Addr []string
	// Database holds the ledger's tables; it is created if missing.
	Database string
	User     string
	Password string
	// DialTimeout bounds connecting (default 5s).
	DialTimeout time.Duration
}

// Ledger is the usage ledger in one ClickHouse database.
type Ledger struct {
	conn driver.Conn
	db   string
	// insertPrefix and rollupPrefix start the query ids of the inserts into
	// the events and the rollups (see FinishInserts); tag is this Ledger's
	// part of them, inserts counts them.
	insertPrefix, rollupPrefix string
	tag                        string
	inserts                    atomic.Uint64
}

var identifier = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,63}$`)

// Open prepares a connection pool; it does not connect until first used.
func Open(o Options) (*Ledger, error) {
	if !identifier.MatchString(o.Database) {
		return nil, fmt.Errorf("clickhouse database %q: want letters, digits and _ (at most 64): %w", o.Database, ErrConfig)
	}
	if len(o.Addr) == 0 {
		return nil, fmt.Errorf("clickhouse address: empty: %w", ErrConfig)
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	if o.User == "" {
		o.User = "default"
	}
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:         o.Addr,
		Auth:         clickhouse.Auth{Username: o.User, Password: o.Password},
		DialTimeout:  o.DialTimeout,
		MaxOpenConns: 4,
		MaxIdleConns: 2,
	})
	if err != nil {
		return nil, fmt.Errorf("clickhouse %v: %w", o.Addr, err)
	}
	var tag [6]byte
	_, _ = rand.Read(tag[:])
	return &Ledger{conn: conn, db: o.Database, tag: hex.EncodeToString(tag[:]),
		insertPrefix: "tessera-settle-" + o.Database + "-", rollupPrefix: "tessera-rollup-" + o.Database + "-"}, nil
}

// Close closes the connections.
func (l *Ledger) Close() error { return l.conn.Close() }

// sql puts the database name into a statement.
func (l *Ledger) sql(s string) string { return strings.ReplaceAll(s, "{db}", l.db) }

// Ping checks that ClickHouse answers.
func (l *Ledger) Ping(ctx context.Context) error {
	if err := l.conn.Ping(ctx); err != nil {
		return fmt.Errorf("clickhouse ping: %w", err)
	}
	return nil
}

// Migrate creates the database and applies the migrations it lacks, in
// order, recording each in {db}.schema_migrations. Every statement is
// idempotent, so two instances migrating at once do no harm.
func (l *Ledger) Migrate(ctx context.Context) error {
	for _, s := range []string{
		"CREATE DATABASE IF NOT EXISTS {db}",
		`CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
			version UInt32,
			name String,
			applied_at DateTime
		) ENGINE = MergeTree() ORDER BY version`,
	} {
		if err := l.conn.Exec(ctx, l.sql(s)); err != nil {
			return fmt.Errorf("clickhouse migrate: %w", err)
		}
	}
	var current uint32
	if err := l.conn.QueryRow(ctx, l.sql("SELECT max(version) FROM {db}.schema_migrations")).Scan(&current); err != nil {
		return fmt.Errorf("clickhouse migrate: schema version: %w", err)
	}
	for _, m := range migrations {
		if m.version <= current {
			continue
		}
		for _, s := range m.statements {
			if err := l.conn.Exec(ctx, l.sql(s)); err != nil {
				return fmt.Errorf("clickhouse migration %d (%s): %w", m.version, m.name, err)
			}
		}
		if err := l.insertRow(ctx, "INSERT INTO {db}.schema_migrations (version, name, applied_at)",
			m.version, m.name, time.Now().UTC()); err != nil {
			return fmt.Errorf("clickhouse migration %d (%s): record: %w", m.version, m.name, err)
		}
	}
	return nil
}

// insertRow inserts one row as a data block: ClickHouse 18.16 does not
// take VALUES inline in a native-protocol query.
func (l *Ledger) insertRow(ctx context.Context, insert string, values ...any) error {
	b, err := l.conn.PrepareBatch(ctx, l.sql(insert))
	if err != nil {
		return err
	}
	defer b.Close()
	if err := b.Append(values...); err != nil {
		return err
	}
	return b.Send()
}

// Version is the highest migration applied.
func (l *Ledger) Version(ctx context.Context) (uint32, error) {
	var v uint32
	if err := l.conn.QueryRow(ctx, l.sql("SELECT max(version) FROM {db}.schema_migrations")).Scan(&v); err != nil {
		return 0, fmt.Errorf("clickhouse schema version: %w", err)
	}
	return v, nil
}

// LatestVersion is the version Migrate brings the ledger to.
func LatestVersion() uint32 { return migrations[len(migrations)-1].version }

// Row is one verified, priced usage event to settle.
type Row struct {
	// Seq is the event's sequence in stream USAGE.
	Seq           uint64
	Event         *wire.UsageEvent
	PriceVersion  uint64
	ChargeMicros  int64
	EarningMicros int64
}

const insertEvents = `INSERT INTO {db}.usage_events (seq, id, request, customer, supplier, node, model, fragment, device_type,
	prompt_tokens, generated_tokens, layer_tokens, messages, flops, compute_us, start_us, end_us, end_time,
	public_key, price_version, charge_micros, earning_micros, settled_at)`

// Insert stores rows, which must be in ascending Seq order and above
// MaxSeq, in one insert: all of them or, on error, possibly all of them (the
// insert may have been written before the error reached us; call MaxSeq
// before retrying). settledAt is one time for the whole insert so that it
// lands in one partition, as one part.
func (l *Ledger) Insert(ctx context.Context, rows []Row, settledAt time.Time) error {
	if len(rows) == 0 {
		return nil
	}
	n := len(rows)
	var (
		seq                                                         = make([]uint64, n)
		id, request, customer, supplier, node, model, fragment, dev = make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		prompt, generated, layerTok, messages, flops, computeUS     = make([]int64, n), make([]int64, n), make([]int64, n), make([]int64, n), make([]int64, n), make([]int64, n)
		startUS, endUS, charge, earning                             = make([]int64, n), make([]int64, n), make([]int64, n), make([]int64, n)
		endTime, settled                                            = make([]time.Time, n), make([]time.Time, n)
		pub                                                         = make([]string, n)
		priceVersion                                                = make([]uint64, n)
	)
	settledAt = settledAt.UTC().Truncate(time.Second)
	for i, r := range rows {
		e := r.Event
		seq[i] = r.Seq
		id[i], request[i], customer[i], supplier[i] = e.ID, e.Request, e.Customer, e.Supplier
		node[i], model[i], fragment[i], dev[i] = e.Node, e.Model, e.Fragment, e.DeviceType
		prompt[i], generated[i], layerTok[i] = e.PromptTokens, e.GeneratedTokens, e.LayerTokens
		messages[i], flops[i], computeUS[i] = e.Messages, e.FLOPs, e.ComputeUS
		startUS[i], endUS[i], endTime[i] = e.Start.UnixMicro(), e.End.UnixMicro(), e.End.UTC().Truncate(time.Second)
		pub[i], priceVersion[i], charge[i], earning[i] = e.PublicKey, r.PriceVersion, r.ChargeMicros, r.EarningMicros
		settled[i] = settledAt
	}
	ctx = clickhouse.Context(ctx, clickhouse.WithQueryID(l.queryID(l.insertPrefix)))
	b, err := l.conn.PrepareBatch(ctx, l.sql(insertEvents))
	if err != nil {
		return fmt.Errorf("clickhouse insert: %w", err)
	}
	defer b.Close()
	for i, col := range []any{seq, id, request, customer, supplier, node, model, fragment, dev,
		prompt, generated, layerTok, messages, flops, computeUS, startUS, endUS, endTime,
		pub, priceVersion, charge, earning, settled} {
		if err := b.Column(i).Append(col); err != nil {
			return fmt.Errorf("clickhouse insert: column %d: %w", i, err)
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("clickhouse insert of %d rows: %w", n, err)
	}
	return nil
}

func (l *Ledger) queryID(prefix string) string {
	return fmt.Sprintf("%s%s-%d", prefix, l.tag, l.inserts.Add(1))
}

// FinishInserts returns once no insert into the events table runs any more,
// killing those that still do. ClickHouse completes an insert whose data it
// has received even when the client that sent it is gone (crashed,
// cancelled, cut off), so after a writer stops, the position (MaxSeq) is
// only final once its inserts have ended. Call it before MaxSeq when
// (re)starting from the position.
func (l *Ledger) FinishInserts(ctx context.Context) error { return l.finish(ctx, l.insertPrefix) }

// FinishRollups is FinishInserts for the rollup steps: call it before the
// first Rollup and after a failed one.
func (l *Ledger) FinishRollups(ctx context.Context) error { return l.finish(ctx, l.rollupPrefix) }

func (l *Ledger) finish(ctx context.Context, prefix string) error {
	for {
		var running uint64
		if err := l.conn.QueryRow(ctx, "SELECT count() FROM system.processes WHERE startsWith(query_id, ?)", prefix).Scan(&running); err != nil {
			return fmt.Errorf("clickhouse running inserts: %w", err)
		}
		if running == 0 {
			return nil
		}
		if err := l.conn.Exec(ctx, "KILL QUERY WHERE startsWith(query_id, ?) SYNC", prefix); err != nil {
			return fmt.Errorf("clickhouse kill running inserts: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// MaxSeq is the ledger's position: the highest USAGE sequence stored (0 when
// empty).
func (l *Ledger) MaxSeq(ctx context.Context) (uint64, error) {
	var seq uint64
	if err := l.conn.QueryRow(ctx, l.sql("SELECT max(seq) FROM {db}.usage_events")).Scan(&seq); err != nil {
		return 0, fmt.Errorf("clickhouse max seq: %w", err)
	}
	return seq, nil
}

// Rollup adds the events with seq in (rollup position, upTo] to every hourly
// rollup table, each table in one INSERT ... SELECT (one part), so that a
// step is applied once even when interrupted (after an interruption, call
// FinishRollups before the next step). upTo must not exceed MaxSeq.
func (l *Ledger) Rollup(ctx context.Context, upTo uint64) error {
	for _, r := range rollups {
		var from uint64
		if err := l.conn.QueryRow(ctx, l.sql("SELECT maxMerge(seq_hi) FROM {db}."+r.table)).Scan(&from); err != nil {
			return fmt.Errorf("clickhouse rollup %s position: %w", r.table, err)
		}
		if upTo <= from {
			continue
		}
		cols := append(append([]string{"hour"}, r.keys...), "events")
		sel := append(append([]string{"toStartOfHour(end_time) AS hour"}, r.keys...), "count()")
		for _, s := range r.sums {
			cols = append(cols, s)
			sel = append(sel, "sum("+s+")")
		}
		cols = append(cols, "seq_hi")
		sel = append(sel, "maxState(seq)")
		q := fmt.Sprintf("INSERT INTO {db}.%s (%s) SELECT %s FROM {db}.usage_events WHERE seq > ? AND seq <= ? GROUP BY hour, %s",
			r.table, strings.Join(cols, ", "), strings.Join(sel, ", "), strings.Join(r.keys, ", "))
		qctx := clickhouse.Context(ctx, clickhouse.WithQueryID(l.queryID(l.rollupPrefix)))
		if err := l.conn.Exec(qctx, l.sql(q), from, upTo); err != nil {
			return fmt.Errorf("clickhouse rollup %s (%d, %d]: %w", r.table, from, upTo, err)
		}
	}
	return nil
}

// RollupPosition is the lowest position of the rollup tables: every event up
// to it is in all of them.
func (l *Ledger) RollupPosition(ctx context.Context) (uint64, error) {
	var lowest uint64
	for i, r := range rollups {
		var p uint64
		if err := l.conn.QueryRow(ctx, l.sql("SELECT maxMerge(seq_hi) FROM {db}."+r.table)).Scan(&p); err != nil {
			return 0, fmt.Errorf("clickhouse rollup %s position: %w", r.table, err)
		}
		if i == 0 || p < lowest {
			lowest = p
		}
	}
	return lowest, nil
}

// NodeKeys returns every public key recorded per node.
func (l *Ledger) NodeKeys(ctx context.Context) (map[string][]string, error) {
	rows, err := l.conn.Query(ctx, l.sql("SELECT DISTINCT node, public_key FROM {db}.node_keys"))
	if err != nil {
		return nil, fmt.Errorf("clickhouse node keys: %w", err)
	}
	defer rows.Close()
	keys := map[string][]string{}
	for rows.Next() {
		var node, key string
		if err := rows.Scan(&node, &key); err != nil {
			return nil, fmt.Errorf("clickhouse node keys: %w", err)
		}
		keys[node] = append(keys[node], key)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("clickhouse node keys: %w", err)
	}
	return keys, nil
}

// SaveNodeKey records that the registry held key for node.
func (l *Ledger) SaveNodeKey(ctx context.Context, node, key string, seen time.Time) error {
	if err := l.insertRow(ctx, "INSERT INTO {db}.node_keys (node, public_key, first_seen)", node, key, seen.UTC()); err != nil {
		return fmt.Errorf("clickhouse save key of %s: %w", node, err)
	}
	return nil
}

// lookupChunk is how many event ids one StoredIDs query names, so that
// the query stays well under ClickHouse's max_query_size (256 KiB).
const lookupChunk = 1000

// StoredIDs returns which of the ids of events are stored already. Only
// the parts where such an event can be are read: its customer and end
// time (whole seconds) lead the sort key, and it was settled after it
// ended, less an hour for settlement's clock being behind the node's.
func (l *Ledger) StoredIDs(ctx context.Context, events []*wire.UsageEvent) (map[string]bool, error) {
	found := map[string]bool{}
	for len(events) > 0 {
		n := min(len(events), lookupChunk)
		if err := l.storedIDs(ctx, events[:n], found); err != nil {
			return nil, err
		}
		events = events[n:]
	}
	return found, nil
}

func (l *Ledger) storedIDs(ctx context.Context, events []*wire.UsageEvent, found map[string]bool) error {
	ids := make([]any, 0, len(events))
	customers := map[string]bool{}
	var cs []any
	from, to := events[0].End, events[0].End
	for _, e := range events {
		ids = append(ids, e.ID)
		if !customers[e.Customer] {
			customers[e.Customer] = true
			cs = append(cs, e.Customer)
		}
		from, to = minTime(from, e.End), maxTime(to, e.End)
	}
	from = from.UTC().Truncate(time.Second)
	rows, err := l.conn.Query(ctx, l.sql(`SELECT DISTINCT id FROM {db}.usage_events
		WHERE customer IN ? AND end_time >= toDateTime(?) AND end_time <= toDateTime(?) AND settled_at >= toDateTime(?) AND id IN ?`),
		clickhouse.GroupSet{Value: cs}, from.Unix(), to.Unix(), from.Add(-time.Hour).Unix(), clickhouse.GroupSet{Value: ids})
	if err != nil {
		return fmt.Errorf("clickhouse stored ids: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return fmt.Errorf("clickhouse stored ids: %w", err)
		}
		found[id] = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("clickhouse stored ids: %w", err)
	}
	return nil
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
