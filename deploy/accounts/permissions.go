// Package accounts is the grid's NATS security model: who may publish and
// subscribe on which subject, and the operator, account and user JWTs that
// carry those permissions to the servers.
//
// Every identity belongs to one role. A role's permissions are a template in
// which "{{name()}}" stands for the identity's name (a node id or a customer
// id): the servers fill it in from the user JWT, whose signing key is scoped
// to that role, so that an identity can never hold more than its role allows
// and a new supplier or customer joins without any change to the servers.
// Everything not listed is denied.
package accounts

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

// Role is what an identity is to the grid.
type Role string

// Roles.
const (
	// RoleAdmin may do everything: bootstrap streams, import models, add
	// API keys. Its credentials stay with the operator.
	RoleAdmin Role = "admin"
	// RoleRegistry is the registry service.
	RoleRegistry Role = "registry"
	// RolePlanner is the planner service.
	RolePlanner Role = "planner"
	// RoleRouter is the router service.
	RoleRouter Role = "router"
	// RoleSettlement is the settlement service.
	RoleSettlement Role = "settlement"
	// RoleExecutor is one supplier node; its name is the node id.
	RoleExecutor Role = "executor"
	// RoleCustomer is one enterprise customer reading its usage; its name is
	// the customer id.
	RoleCustomer Role = "customer"
	// RoleLeaf is a supplier site's leaf node connection; its name is the
	// supplier id and its permissions the union of its nodes' (IssueLeaf).
	RoleLeaf Role = "leaf"
)

// Roles lists every role that has a permission template (all but admin).
func Roles() []Role {
	return []Role{RoleRegistry, RolePlanner, RoleRouter, RoleSettlement, RoleExecutor, RoleCustomer}
}

// NameVar is the template variable that the servers replace with the
// user's name (the node or customer id).
const NameVar = "{{name()}}"

// Permissions are the subjects an identity may publish and subscribe to;
// everything else is denied.
type Permissions struct {
	// Publish lists the subjects the identity may publish to.
	Publish []string `json:"publish"`
	// Subscribe lists the subjects the identity may subscribe to.
	Subscribe []string `json:"subscribe"`
	// Responses lets the identity publish one reply to each request it
	// received, whatever the reply subject, for this long after the request
	// (allow_responses); zero allows none.
	Responses time.Duration `json:"responses,omitempty"`
}

// JetStream names the JetStream API that permissions refer to: the grid's
// own ("$JS.API") or, for clients behind a leaf node, the grid's domain.
type JetStream struct {
	// Domain is the grid's JetStream domain; empty for clients connected to
	// the grid's servers directly.
	Domain string
}

// api is the JetStream API prefix.
func (j JetStream) api() string {
	if j.Domain == "" {
		return "$JS.API"
	}
	return "$JS." + j.Domain + ".API"
}

// Template returns role's permissions with NameVar standing for the
// identity's name.
func Template(role Role, js JetStream) (Permissions, error) {
	if js.Domain != "" {
		// A domain with '.', '*' or '>' would widen every JetStream grant.
		if err := subjects.Token(js.Domain); err != nil {
			return Permissions{}, fmt.Errorf("JetStream domain: %w", err)
		}
	}
	n := NameVar
	var p Permissions
	switch role {
	case RoleExecutor:
		p = Permissions{
			Publish: cat(
				[]string{subjects.Heartbeat(n), subjects.UsageNode(n), subjects.DeadLetter(string(RoleExecutor), "*")},
				js.kvRead(subjects.BucketPlans, true),
				// Watched too: a node follows model manifests (speed measured per model).
				js.kvRead(subjects.BucketModels, true),
				js.objectRead(subjects.ObjectFragments),
			),
			Subscribe: []string{
				subjects.Stage(n), subjects.Control(n), subjects.Challenge(n), subjects.Expert(n),
				subjects.SessionRelease, subjects.NodeInbox(n) + ".>",
			},
			Responses: replyWindow,
		}
	case RoleCustomer:
		p = Permissions{
			Publish: cat(
				[]string{subjects.SettlementCustomerConsumer(n), subjects.Completions, subjects.ChatCompletions, subjects.Models},
				js.pull(subjects.StreamCustomerUsage, n),
			),
			Subscribe: []string{subjects.CustomerInbox(n) + ".>"},
		}
	case RoleRegistry:
		p = service(role, js,
			[]string{subjects.MembershipAll, subjects.Challenge("*"), subjects.Control("*")},
			[]string{subjects.HeartbeatAll, subjects.RegistryPrefix + ".>"},
			js.kvWrite(subjects.BucketNodes), js.kvWrite(subjects.BucketNodeKeys),
			// Challenges: the registry computes expected outputs from fragments.
			js.kvRead(subjects.BucketModels, false), js.objectRead(subjects.ObjectFragments),
		)
	case RolePlanner:
		p = service(role, js,
			[]string{subjects.PlanEventsAll},
			[]string{subjects.PlannerPrefix + ".>"},
			js.kvRead(subjects.BucketNodes, true), js.kvRead(subjects.BucketModels, true), js.kvWrite(subjects.BucketPlans),
			// Expert-use counts balance the experts of split layers.
			js.kvRead(subjects.BucketExpertLoad, false),
		)
	case RoleRouter:
		p = service(role, js,
			// Streamed chunks go to the inbox the requester names; the
			// console asks settlement for its lag.
			[]string{subjects.Stage("*"), subjects.Control("*"), subjects.Expert("*"), subjects.SessionRelease, "_INBOX.>",
				subjects.ServiceStats("settlement")},
			[]string{subjects.Root + ".api.>"},
			js.kvRead(subjects.BucketModels, true), js.kvRead(subjects.BucketPlans, true), js.kvRead(subjects.BucketNodes, true),
			js.kvRead(subjects.BucketAPIKeys, false), js.kvWrite(subjects.BucketExpertLoad), js.objectRead(subjects.ObjectFragments),
			// The console follows the grid's event streams.
			js.streamTail(subjects.StreamMembership, subjects.MembershipAll),
			js.streamTail(subjects.StreamPlanEvents, subjects.PlanEventsAll),
			js.streamTail(subjects.StreamDeadLetter, subjects.DeadLetterAll),
		)
	case RoleSettlement:
		p = service(role, js,
			[]string{subjects.CustomerUsageAll},
			[]string{subjects.SettlementPrefix + ".>"},
			js.consume(subjects.StreamUsage), js.consume(subjects.StreamCustomerUsage),
			js.kvRead(subjects.BucketNodes, true), js.kvRead(subjects.BucketPrices, true),
		)
	case RoleAdmin:
		return Permissions{}, fmt.Errorf("role %s: %w", role, ErrUnrestricted)
	default:
		return Permissions{}, fmt.Errorf("role %q: %w", role, ErrUnknownRole)
	}
	return p, nil
}

// service is what every grid service shares: its own dead letters, micro
// discovery ($SRV), its private inbox and answering requests.
func service(role Role, js JetStream, publish, subscribe []string, jsPublish ...[]string) Permissions {
	window := replyWindow
	if role == RoleRouter {
		window = routerReplyWindow
	}
	return Permissions{
		Publish:   cat(append([][]string{publish, {subjects.DeadLetter(string(role), "*")}}, jsPublish...)...),
		Subscribe: append(subscribe, "$SRV.>", subjects.ServiceInbox(string(role))+".>"),
		Responses: window,
	}
}

// replyWindow is how long after a request an identity may still answer it.
const replyWindow = 2 * time.Minute

// routerReplyWindow covers a whole generation over NATS: it must exceed
// TESSERA_ROUTER_REQUEST_TIMEOUT (default 5m).
const routerReplyWindow = 15 * time.Minute

// For returns role's permissions for the identity called name.
func For(role Role, name string, js JetStream) (Permissions, error) {
	if err := subjects.Token(name); err != nil {
		return Permissions{}, fmt.Errorf("%s name: %w", role, err)
	}
	p, err := Template(role, js)
	if err != nil {
		return Permissions{}, err
	}
	return p.expand(name), nil
}

func (p Permissions) expand(name string) Permissions {
	f := func(in []string) []string {
		out := make([]string, len(in))
		for i, s := range in {
			out[i] = strings.ReplaceAll(s, NameVar, name)
		}
		return out
	}
	return Permissions{Publish: f(p.Publish), Subscribe: f(p.Subscribe), Responses: p.Responses}
}

// Merge returns the union of ps (used for a supplier's leaf node, which
// carries the traffic of all its nodes).
func Merge(ps ...Permissions) Permissions {
	var out Permissions
	for _, p := range ps {
		out.Publish = append(out.Publish, p.Publish...)
		out.Subscribe = append(out.Subscribe, p.Subscribe...)
		out.Responses = max(out.Responses, p.Responses)
	}
	slices.Sort(out.Publish)
	out.Publish = slices.Compact(out.Publish)
	slices.Sort(out.Subscribe)
	out.Subscribe = slices.Compact(out.Subscribe)
	return out
}

// InboxPrefix is the NATS_INBOX_PREFIX an identity must use: the only
// place its permissions let it receive replies. Admin uses the default.
func InboxPrefix(role Role, name string) string {
	switch role {
	case RoleExecutor:
		return subjects.NodeInbox(name)
	case RoleCustomer:
		return subjects.CustomerInbox(name)
	case RoleAdmin, RoleLeaf:
		return ""
	}
	return subjects.ServiceInbox(string(role))
}

func cat(lists ...[]string) []string {
	var out []string
	for _, l := range lists {
		out = append(out, l...)
	}
	return out
}
