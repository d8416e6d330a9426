package ledger

// migration is one versioned change of the ledger's tables. Released
// migrations never change: a new table or column is a new migration.
// Statements use {db} for the database; they must run on ClickHouse 18.16
// (Debian) and on current releases: no settings, no newer functions.
type migration struct {
	version    uint32
	name       string
	statements []string
}

// migrations lists every migration in version order.
var migrations = []migration{
	{1, "usage events", []string{
		// One row per settled usage event. seq is the event's sequence in
		// stream USAGE: what makes the ledger exactly-once (see Ledger).
		// Partitioned by settlement month: an insert has one settled_at, so
		// it writes one part and is atomic.
		`CREATE TABLE IF NOT EXISTS {db}.usage_events (
			seq UInt64,
			id String,
			request String,
			customer String,
			supplier String,
			node String,
			model String,
			fragment String,
			device_type String,
			prompt_tokens Int64,
			generated_tokens Int64,
			layer_tokens Int64,
			messages Int64,
			flops Int64,
			compute_us Int64,
			start_us Int64,
			end_us Int64,
			end_time DateTime,
			public_key String,
			price_version UInt64,
			charge_micros Int64,
			earning_micros Int64,
			settled_at DateTime
		) ENGINE = MergeTree()
		PARTITION BY toYYYYMM(settled_at)
		ORDER BY (customer, end_time, seq)`,
	}},
	{2, "node keys", []string{
		// Every public key the registry held for a node, so that events
		// signed by a node that has since left still verify after a restart.
		`CREATE TABLE IF NOT EXISTS {db}.node_keys (
			node String,
			public_key String,
			first_seen DateTime
		) ENGINE = ReplacingMergeTree()
		ORDER BY (node, public_key)`,
	}},
	{3, "hourly rollups", []string{
		// Rollups are summed by merges; seq_hi (the highest usage_events
		// seq rolled up) is merged by max, so that every rollup step is
		// applied exactly once. Not partitioned: a step writes one part.
		`CREATE TABLE IF NOT EXISTS {db}.usage_hourly_customer (
			hour DateTime,
			customer String,
			model String,
			events UInt64,
			prompt_tokens Int64,
			generated_tokens Int64,
			layer_tokens Int64,
			compute_us Int64,
			charge_micros Int64,
			seq_hi AggregateFunction(max, UInt64)
		) ENGINE = SummingMergeTree()
		ORDER BY (customer, hour, model)`,
		`CREATE TABLE IF NOT EXISTS {db}.usage_hourly_supplier (
			hour DateTime,
			supplier String,
			device_type String,
			events UInt64,
			layer_tokens Int64,
			compute_us Int64,
			earning_micros Int64,
			seq_hi AggregateFunction(max, UInt64)
		) ENGINE = SummingMergeTree()
		ORDER BY (supplier, hour, device_type)`,
		`CREATE TABLE IF NOT EXISTS {db}.usage_hourly_model (
			hour DateTime,
			model String,
			events UInt64,
			prompt_tokens Int64,
			generated_tokens Int64,
			layer_tokens Int64,
			messages Int64,
			flops Int64,
			compute_us Int64,
			charge_micros Int64,
			earning_micros Int64,
			seq_hi AggregateFunction(max, UInt64)
		) ENGINE = SummingMergeTree()
		ORDER BY (model, hour)`,
	}},
}

// rollup describes how one hourly rollup table is filled from usage_events:
// grouped by the hour of end_time and keys, summing sums.
type rollup struct {
	table string
	keys  []string
	sums  []string
}

// rollups lists the hourly rollup tables (created by migration 3).
var rollups = []rollup{
	{"usage_hourly_customer", []string{"customer", "model"},
		[]string{"prompt_tokens", "generated_tokens", "layer_tokens", "compute_us", "charge_micros"}},
	{"usage_hourly_supplier", []string{"supplier", "device_type"},
		[]string{"layer_tokens", "compute_us", "earning_micros"}},
	{"usage_hourly_model", []string{"model"},
		[]string{"prompt_tokens", "generated_tokens", "layer_tokens", "messages", "flops", "compute_us", "charge_micros", "earning_micros"}},
}
