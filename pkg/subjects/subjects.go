// Package subjects is the one catalogue of every NATS subject, stream, key-value
// bucket and object store that Tessera uses. Nothing else in the tree spells a
// subject by hand: permissions (deploy/) and consumers read the same names.
//
// Tokens that come from outside (node ids, customer ids, model ids) are
// checked with Token before they are put into a subject, so that a hostile
// id cannot widen a subscription with '*' or '>' or split a subject with '.'.
package subjects

import (
	"fmt"
	"strings"
)

// Root is the first token of every Tessera subject.
const Root = "tessera"

// Streams.
const (
	// StreamUsage holds signed usage events published by executors; settlement
	// consumes it. Subjects: UsageNode(node).
	StreamUsage = "USAGE"
	// StreamCustomerUsage holds verified, priced usage events per customer;
	// each enterprise customer may read its own subjects only.
	StreamCustomerUsage = "CUSTOMER_USAGE"
	// StreamMembership holds node membership events (joined, left, degraded,
	// draining, quarantined) written by the registry.
	StreamMembership = "MEMBERSHIP"
	// StreamDeadLetter holds messages that could not be processed, each with
	// the reason, so that nothing malformed is silently dropped.
	StreamDeadLetter = "DEADLETTER"
	// StreamPlanEvents holds one event per published plan (what changed, why).
	StreamPlanEvents = "PLAN_EVENTS"
)

// Key-value buckets.
const (
	// BucketNodes maps node id to its live record; keys expire (per-key TTL)
	// when heartbeats stop.
	BucketNodes = "nodes"
	// BucketModels maps model id to its manifest.
	BucketModels = "models"
	// BucketPlans maps model id to its current plan (compare-and-set on revision).
	BucketPlans = "plans"
	// BucketAPIKeys maps the sha256 of an API key to its customer record.
	BucketAPIKeys = "apikeys"
	// BucketPrices holds the versioned price book.
	BucketPrices = "prices"
	// BucketNodeKeys maps node id to the public key it first joined with
	// (trust on first use): a heartbeat for that node signed by any other
	// key is refused. It has no TTL; an operator deletes a key to re-key a node.
	BucketNodeKeys = "nodekeys"
	// BucketExpertLoad maps model id to the router's expert-use counts.
	BucketExpertLoad = "expertload"
)

// KeyPriceBook is the key of the price book in BucketPrices; each put is a
// new version.
const KeyPriceBook = "book"

// ObjectFragments is the object store holding fragment blobs and tokenizers,
// content-addressed by sha256.
const ObjectFragments = "fragments"

// Wildcards for stream subject filters and permissions.
const (
	// UsageAll matches every node's usage subject (stream USAGE).
	UsageAll = Root + ".usage.node.*"
	// CustomerUsageAll matches every customer's usage subjects.
	CustomerUsageAll = Root + ".usage.customer.>"
	// MembershipAll matches every membership event.
	MembershipAll = Root + ".membership.>"
	// DeadLetterAll matches every dead-letter subject.
	DeadLetterAll = Root + ".deadletter.>"
	// PlanEventsAll matches every plan event.
	PlanEventsAll = Root + ".plan.>"
	// HeartbeatAll matches every node's heartbeat subject.
	HeartbeatAll = Root + ".node.*.heartbeat"
	// NodeAll matches every subject addressed to nodes.
	NodeAll = Root + ".node.>"
)

// Request subjects served by services (NATS micro endpoints).
const (
	// Completions is the router's NATS request subject for in-grid clients
	// (body: wire.CompletionRequest; reply: wire.CompletionResponse).
	Completions = Root + ".api.completions"
	// ChatCompletions is the chat variant of Completions.
	ChatCompletions = Root + ".api.chat.completions"
	// Models lists the models the router can serve.
	Models = Root + ".api.models"
	// RegistryPrefix is the subject prefix of the registry's micro endpoints.
	RegistryPrefix = Root + ".registry"
	// RegistryNodesList lists node records (body: wire.NodeQuery; reply:
	// wire.NodeList).
	RegistryNodesList = RegistryPrefix + ".nodes.list"
	// RegistryNodesGet returns one node's record (body: wire.NodeQuery with
	// Node set; reply: wire.NodeRecord).
	RegistryNodesGet = RegistryPrefix + ".nodes.get"
	// RegistryStats returns the registry's counters (reply: wire.RegistryStats).
	RegistryStats = RegistryPrefix + ".stats"
	// SettlementPrefix is the subject prefix of settlement's micro endpoints.
	SettlementPrefix = Root + ".settlement"
	// SettlementCustomerStatement answers a customer's usage and charges
	// between two times (settlement micro endpoint).
	SettlementCustomerStatement = SettlementPrefix + ".statement.customer"
	// SettlementSupplierStatement answers a supplier's earnings between two
	// times (settlement micro endpoint).
	SettlementSupplierStatement = SettlementPrefix + ".statement.supplier"
	// SettlementCustomerConsumerAll matches every customer's
	// SettlementCustomerConsumer subject (what settlement serves).
	SettlementCustomerConsumerAll = SettlementPrefix + ".consumer.*"
	// PlannerPrefix is the subject prefix of the planner's micro endpoints.
	PlannerPrefix = Root + ".planner"
	// SessionRelease is where the router announces that a request ended, so
	// that every executor frees its KV cache for it.
	SessionRelease = Root + ".session.release"
)

// Heartbeat is the subject on which node publishes its heartbeats.
func Heartbeat(node string) string { return Root + ".node." + node + ".heartbeat" }

// Stage is the subject on which node serves stage (forward-pass) requests.
func Stage(node string) string { return Root + ".node." + node + ".stage" }

// Expert is the subject on which node serves expert-group requests.
func Expert(node string) string { return Root + ".node." + node + ".expert" }

// Challenge is the subject on which node answers the registry's speed and
// correctness challenges.
func Challenge(node string) string { return Root + ".node." + node + ".challenge" }

// Control is the subject on which node takes control messages (drain, release).
func Control(node string) string { return Root + ".node." + node + ".control" }

// UsageNode is the subject on which node publishes its usage events.
func UsageNode(node string) string { return Root + ".usage.node." + node }

// CustomerUsage is the subject of one customer's verified usage for model.
func CustomerUsage(customer, model string) string {
	return Root + ".usage.customer." + customer + "." + model
}

// CustomerUsageFilter matches all of one customer's usage subjects.
func CustomerUsageFilter(customer string) string { return Root + ".usage.customer." + customer + ".>" }

// SettlementCustomerConsumer is where customer asks settlement to create
// or reposition its durable consumer on its usage (for example to replay
// from a point in time); the subject, which only that customer may publish
// to, names the customer.
func SettlementCustomerConsumer(customer string) string {
	return SettlementPrefix + ".consumer." + customer
}

// CustomerInbox is the inbox prefix of customer's own NATS clients: its
// permissions let it receive replies there and nowhere else.
func CustomerInbox(customer string) string { return "_INBOX.customer." + customer }

// Membership is the subject of a membership event of kind for node.
func Membership(node, kind string) string { return Root + ".membership." + node + "." + kind }

// DeadLetter is the subject under which service dead-letters a message.
func DeadLetter(service, reason string) string {
	return Root + ".deadletter." + service + "." + reason
}

// PlanEvent is the subject of plan events for model.
func PlanEvent(model string) string { return Root + ".plan." + model }

// Token reports whether s may be used as one subject token: non-empty, at
// most 128 bytes, and made of letters, digits, '-' and '_' only.
func Token(s string) error {
	if s == "" {
		return fmt.Errorf("empty subject token")
	}
	if len(s) > 128 {
		return fmt.Errorf("subject token %.16q... longer than 128 bytes", s)
	}
	if i := strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	}); i >= 0 {
		return fmt.Errorf("subject token %q has invalid character %q at %d", s, s[i], i)
	}
	return nil
}

// NodeInbox is the inbox prefix of executor node's NATS client: replies to
// its requests, JetStream acknowledgements and watcher deliveries arrive
// under it, and its permissions let it subscribe there and nowhere else. It
// lies outside "_INBOX.>", where the router may publish streamed chunks.
func NodeInbox(node string) string { return "_INBOX_node_" + node }

// ServiceInbox is the inbox prefix of a grid service's NATS clients (for
// example "registry"), private to that service like NodeInbox.
func ServiceInbox(service string) string { return "_INBOX_svc_" + service }

// ServiceStats is the micro discovery subject that every instance of a
// service (for example "settlement") answers with its statistics; the
// router's console reads settlement's lag from it.
func ServiceStats(service string) string { return "$SRV.STATS." + service }
